"""A --user-dir for parity tests: fairseq_ext, and every criterion's loss logged once more at full precision.

fairseq rounds the logged ``loss`` to 3 decimals and ``ppl`` to 2; tests that compare runs to 1e-5 or 1e-6 read
``exact_loss`` instead (the same base-2 loss per trained token, as a float64 tensor, which fairseq's log prints
in full).
"""

import torch
from fairseq.logging import metrics

import fairseq_ext  # noqa: F401  (registers hf_finetune, the archs and the criteria)
from fairseq_ext.criterions.base import HFCriterion

_reduce_metrics = HFCriterion.reduce_metrics


def reduce_metrics(logging_outputs) -> None:
    _reduce_metrics(logging_outputs)
    metrics.log_derived("exact_loss", lambda meters: torch.as_tensor(meters["loss"].avg, dtype=torch.float64))


HFCriterion.reduce_metrics = staticmethod(reduce_metrics)
