"""Out of memory stops the run with one line, unless the user asks to skip such batches.

fairseq "recovers" from an out-of-memory error by dropping the batch and training on: a run that runs out
of memory at every update trains on nothing while its logs and speed log look normal. Here an
out-of-memory error ends the run with one message (the update, the peak memory, the settings to change and
the ``run.sh compile`` command that checks them). With ``FAIRSEQ_EXT_SKIP_OOM_BATCHES=1`` (run.sh:
SKIP_OOM_BATCHES=1) fairseq's recovery is kept: each skipped batch is counted and logged, in a field of its own
(``skipped_batches``) of fairseq's training log and of the speed log, and its update counts no tokens in the speed
log (fairseq's own token counts never include it: a dropped batch has no logging output).
"""

import logging
import os
from typing import Tuple

import torch
from fairseq.logging import metrics

from ..errors import UserInputError

SKIP_VARIABLE = "FAIRSEQ_EXT_SKIP_OOM_BATCHES"

logger = logging.getLogger(__name__)


def skipping_allowed() -> bool:
    """Whether the user asked to skip batches that run out of memory."""
    return os.environ.get(SKIP_VARIABLE, "0") == "1"


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError saying so (how fairseq recognises one)."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def _peak(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated of "
            f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
        )
    return "peak not measured on the CPU"


def out_of_memory_error(update: int, device: torch.device) -> UserInputError:
    """The one-line error for an update that ran out of memory."""
    return UserInputError(
        f"out of memory at update {update} ({_peak(device)}); lower BATCH_SIZE (raise GRADIENT_ACCU_NUM to keep the "
        f"global batch) or SEQUENCE_LENGTH, or choose a plan that fits (PLAN_NGPUS, RECOMPUTE_MODULE_NAMES, "
        f"USE_ZERO): `bash run.sh compile` with the same settings and MEM_PER_GPU reports the plan that fits; "
        f"SKIP_OOM_BATCHES=1 skips such batches instead"
    )


class SkippedBatches:
    """Counts the batches fairseq dropped after running out of memory (skipping allowed): on this rank, and over
    the data-parallel ranks where fairseq sums its count of them (runs of several processes)."""

    def __init__(self):
        self.count = 0  # on this rank, since the run started
        self._local = 0  # this update, this rank
        self._all_ranks = None  # this update, summed over the data-parallel ranks (None: one process)

    def saw_out_of_memory(self) -> None:
        self._local += 1

    def summed_over_ranks(self, count) -> None:
        """fairseq's count of this update's out-of-memory batches, summed over the data-parallel ranks."""
        self._all_ranks = int(count)

    def end_update(self, update: int) -> Tuple[int, int]:
        """(batches of this update dropped on this rank, on all ranks); logs this rank's."""
        local, all_ranks = self._local, self._local if self._all_ranks is None else self._all_ranks
        self._local, self._all_ranks = 0, None
        if local:
            self.count += local
            logger.warning(
                f"update {update}: out of memory, batch skipped (SKIP_OOM_BATCHES=1); "
                f"{self.count} skipped so far, none counted as trained"
            )
        return local, all_ranks

    @staticmethod
    def log(all_ranks: int) -> None:
        """The dedicated ``skipped_batches`` field of fairseq's training log (a sum over the logged updates)."""
        metrics.log_scalar_sum("skipped_batches", all_ranks, priority=900, round=0)
