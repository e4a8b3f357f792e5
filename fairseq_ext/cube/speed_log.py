"""``--speed-log FILE`` (run.sh ``SPEED_LOG``): one JSON line per update with its time, the part of it
spent computing, the tokens it processed (``tokens``, padding included; ``trained_tokens``, those the
loss counts), with SKIP_OOM_BATCHES the batches it dropped for running out of memory (``skipped_batches``;
such an update counts no tokens) and the peak device memory so far.

``compute_s`` runs from the start of the update's first forward (the task's ``train_step``) to the end
of its optimizer step; ``step_s`` from the end of the previous update's optimizer step to the end of
this one. ``step_s - compute_s`` is then the time the device spent on anything but the update:
fairseq's bookkeeping (batching, logging, metrics, checkpoint and validation checks) where it was not
hidden behind device work still running.

On GPUs the times are read from CUDA events recorded on the stream, so measuring adds no
synchronization and leaves the overlap of the host's bookkeeping with device work as it is; a record
is written once its events have completed (one update later, the last one when training ends). On
CPUs they are wall-clock times. Peak memory is read as each timed part ends and kept here, because
fairseq resets the device's peak counters at every update (for its own ``gb_free``).
"""

import atexit
import json
import os
import time
from typing import Callable, Optional

import torch


class _Clock:
    """Marks on the timeline of the device's work: CUDA events on GPUs, wall-clock times on CPUs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


class SpeedLog:
    """Times the updates of one training process and appends them to ``path`` as JSON lines."""

    def __init__(self, path: str, device: torch.device):
        self.path = path
        self.device = device
        self._clock = _Clock(device)
        self._file = None
        self._update = 0
        self._start = self._end = self._previous_end = None
        self._pending: Optional[dict] = None  # an update whose record waits for its device work to finish
        self._peaks = {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0}
        atexit.register(self.flush)

    def timed(self, function: Callable) -> Callable:
        """``function`` wrapped as compute of the current update: the first call of an update starts it,
        the end of each call moves its end."""

        def run(*args, **kwargs):
            if self._start is None:
                self._start = self._clock.mark()
            try:
                return function(*args, **kwargs)
            finally:
                self._end = self._clock.mark()
                self._read_peaks()

        return run

    def _read_peaks(self) -> None:
        if self.device.type == "cuda":
            self._peaks["peak_allocated_bytes"] = max(
                self._peaks["peak_allocated_bytes"], torch.cuda.max_memory_allocated(self.device)
            )
            self._peaks["peak_reserved_bytes"] = max(
                self._peaks["peak_reserved_bytes"], torch.cuda.max_memory_reserved(self.device)
            )

    def end_update(
        self, tokens: int, trained_tokens: Optional[int] = None, skipped_batches: Optional[int] = None
    ) -> None:
        """Close the update that processed ``tokens`` input tokens (padding included), of which
        ``trained_tokens`` were trained on, and dropped ``skipped_batches`` batches for running out of memory
        (SKIP_OOM_BATCHES; such an update counts no tokens); write the previous update's record."""
        if self._start is None:  # nothing was timed (a skipped update)
            return
        self.flush()
        self._update += 1
        self._pending = {
            "update": self._update,
            "start": self._start,
            "end": self._end,
            "previous_end": self._previous_end,
            "tokens": int(tokens),
            **self._peaks,
        }
        if trained_tokens is not None:
            self._pending["trained_tokens"] = int(trained_tokens)
        if skipped_batches is not None:
            self._pending["skipped_batches"] = int(skipped_batches)
        self._previous_end, self._start, self._end = self._end, None, None

    def flush(self) -> None:
        """Write the record of the update still pending (waits for its device work)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        start, end, previous_end = pending.pop("start"), pending.pop("end"), pending.pop("previous_end")
        compute = self._clock.seconds(start, end)
        step = compute if previous_end is None else self._clock.seconds(previous_end, end)
        record = {
            "update": pending.pop("update"),
            "step_s": step,
            "compute_s": compute,
            "tokens": pending.pop("tokens"),
        }
        for key in ("trained_tokens", "skipped_batches"):
            if key in pending:
                record[key] = pending.pop(key)
        if self.device.type == "cuda":
            record.update(pending)
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
        self._file.write(json.dumps(record) + "\n")


def batch_tokens(samples) -> int:
    """Input tokens (padding included) in a list of fairseq samples; empty (dummy) samples count none."""
    return sum(s["net_input"]["input_ids"].numel() for s in samples if s and "net_input" in s)


def trained_tokens(samples) -> int:
    """Tokens the loss is computed on (fairseq's ``ntokens``) in a list of fairseq samples."""
    return sum(int(s.get("ntokens", 0)) for s in samples if s and "net_input" in s)
