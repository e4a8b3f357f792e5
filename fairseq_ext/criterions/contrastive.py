"""In-batch contrastive loss for sentence embeddings from a head-less ``AutoModel``."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass

from .base import HFCriterion, logging_output


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states (B, T, H) over the real tokens of each row: (B, H)."""
    mask = attention_mask[..., None].to(hidden_states.dtype)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)


def embed_both(model, net_input, pair_input):
    """Unit-length mean-pooled embeddings of the texts and of their pairs, from one forward of both."""
    width = max(net_input["input_ids"].size(1), pair_input["input_ids"].size(1))
    joined = {
        k: torch.cat(
            [
                F.pad(net_input[k], (0, width - net_input[k].size(1))),
                F.pad(pair_input[k], (0, width - pair_input[k].size(1))),
            ]
        )  # masked padding
        for k in ("input_ids", "attention_mask")
    }
    embeddings = F.normalize(mean_pool(model(**joined).float(), joined["attention_mask"]), dim=-1)
    return embeddings.chunk(2)


@dataclass
class ContrastiveConfig(FairseqDataclass):
    temperature: float = field(default=0.05, metadata={"help": "softmax temperature of the cosine similarities"})


@register_criterion("hf_contrastive", dataclass=ContrastiveConfig)
class ContrastiveLoss(HFCriterion):
    """Symmetric InfoNCE: each text must pick its own pair among the batch's pairs, and each pair its text.

    Embeddings are mean-pooled last hidden states, cosine similarities divided by the temperature.
    ``sample_size`` is the number of pairs; accuracy counts texts whose nearest pair is their own.
    """

    def __init__(self, task, temperature: float = 0.05):
        super().__init__(task)
        self.temperature = temperature

    def forward(self, model, sample, reduce=True):
        texts, pairs = embed_both(model, sample["net_input"], sample["pair_input"])
        scores = texts @ pairs.T / self.temperature  # (B, B): row i's own pair is column i
        own = torch.arange(scores.size(0), device=scores.device)
        loss = (F.cross_entropy(scores, own, reduction="none") + F.cross_entropy(scores.T, own, reduction="none")) / 2
        if reduce:
            loss = loss.sum()
        ncorrect = int((scores.argmax(1) == own).sum())
        size = sample["nsentences"]
        return loss, size, logging_output(loss, sample, size, ncorrect=ncorrect, ntotal=size)
