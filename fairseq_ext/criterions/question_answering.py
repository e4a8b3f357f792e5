"""Extractive QA loss: cross entropy of the answer's start and end token."""

import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass

from .base import HFCriterion, logging_output


@register_criterion("hf_qa", dataclass=FairseqDataclass)
class QuestionAnsweringLoss(HFCriterion):
    """Mean of the start and end cross entropies over the tokens of each sample (padding excluded), summed over
    samples; ``sample_size`` is the number of samples; accuracy counts samples whose start and end are both
    predicted exactly."""

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"]).float()  # (B, T, 2)
        padding = sample["net_input"]["attention_mask"] == 0
        logits = logits.masked_fill(padding[..., None], float("-inf"))
        target = sample["target"]  # (B, 2)
        start_loss = F.cross_entropy(logits[..., 0], target[:, 0], reduction="none")
        end_loss = F.cross_entropy(logits[..., 1], target[:, 1], reduction="none")
        loss = (start_loss + end_loss) / 2
        if reduce:
            loss = loss.sum()
        ncorrect = int((logits.argmax(1) == target).all(dim=1).sum())
        size = sample["nsentences"]
        return loss, size, logging_output(loss, sample, size, ncorrect=ncorrect, ntotal=size)
