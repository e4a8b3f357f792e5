"""Causal LM loss: token-mean cross entropy over the trained (answer) tokens."""

import math

import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from ..data.instruction import IGNORE_INDEX


@register_criterion("hf_causal_lm", dataclass=FairseqDataclass)
class CausalLMLoss(FairseqCriterion):
    """Summed cross entropy of next-token predictions where ``target != -100``.

    ``sample_size`` is the number of trained tokens, so fairseq's division of the summed gradients by
    the summed ``sample_size`` of all workers gives the token-mean loss of the global batch.
    """

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"])  # (B, T, V)
        target = sample["target"]  # (B, T)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), target.view(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum" if reduce else "none")
        sample_size = sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Log loss and nll_loss in base 2 per trained token, and perplexity, as fairseq's LM criteria do."""
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        nll_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        denom = max(sample_size, 1) * math.log(2)
        metrics.log_scalar("loss", loss_sum / denom, sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / denom, sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: 2 ** meters["nll_loss"].avg)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
