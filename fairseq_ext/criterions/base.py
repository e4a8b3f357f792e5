"""What every fairseq_ext criterion logs: loss per unit of ``sample_size`` in base 2, and accuracy."""

import math

from fairseq import metrics
from fairseq.criterions import FairseqCriterion


class HFCriterion(FairseqCriterion):
    """Base of the criteria: summed losses, ``sample_size`` the unit they are averaged over.

    fairseq divides the gradient of the summed loss by the summed ``sample_size`` of all workers, so
    each criterion's loss is a mean over the global batch. Logging outputs may add ``ncorrect`` and
    ``ntotal``: their ratio is logged as ``accuracy`` (percent).
    """

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """Log loss and nll_loss in base 2 per unit of sample_size (as fairseq's criteria do), and accuracy."""
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        nll_sum = sum(log.get("nll_loss", log.get("loss", 0)) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        denom = max(sample_size, 1) * math.log(2)
        metrics.log_scalar("loss", loss_sum / denom, sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / denom, sample_size, round=3)
        total = sum(log.get("ntotal", 0) for log in logging_outputs)
        if total:
            correct = sum(log.get("ncorrect", 0) for log in logging_outputs)
            metrics.log_scalar("accuracy", 100.0 * correct / total, total, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def logging_output(loss, sample, sample_size, **extra) -> dict:
    """The logging output fairseq sums over workers: loss, token and sentence counts, and ``extra`` counts."""
    return {
        "loss": loss.data,
        "ntokens": sample["ntokens"],
        "nsentences": sample["nsentences"],
        "sample_size": sample_size,
        **extra,
    }
