"""Classification losses: one class per sequence, or one class per token."""

import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import FairseqDataclass

from ..data.layouts import IGNORE_INDEX
from .base import HFCriterion, logging_output


@register_criterion("hf_seq_cls", dataclass=FairseqDataclass)
class SequenceClassificationLoss(HFCriterion):
    """Cross entropy of the class logits (B, num_labels) against the labels, summed; ``sample_size`` is the
    number of sequences (a mean over sequences); logs accuracy."""

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"]).float()
        target = sample["target"]
        loss = F.cross_entropy(logits, target, reduction="sum" if reduce else "none")
        ncorrect = int((logits.argmax(-1) == target).sum())
        size = sample["nsentences"]
        return loss, size, logging_output(loss, sample, size, ncorrect=ncorrect, ntotal=size)


@register_criterion("hf_token_cls", dataclass=FairseqDataclass)
class TokenClassificationLoss(HFCriterion):
    """Cross entropy of per-token class logits (B, T, num_labels) over the labelled tokens (first sub-token of
    each word); ``sample_size`` is the number of labelled tokens; logs token accuracy."""

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"]).float()
        target = sample["target"]
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)),
            target.view(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum" if reduce else "none",
        )
        labelled = target != IGNORE_INDEX
        ncorrect = int(((logits.argmax(-1) == target) & labelled).sum())
        size = sample["ntokens"]
        return loss, size, logging_output(loss, sample, size, ncorrect=ncorrect, ntotal=size)
