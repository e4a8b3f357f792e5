"""``--speed-log FILE`` (run.sh ``SPEED_LOG``): one JSON line per update with its wall time, the part of
it spent computing, the tokens it processed and the peak device memory so far.

``step_s`` runs from the end of the previous update to the end of this one, so it holds everything the
training loop does; ``compute_s`` is the synchronized time of the forward and backward passes (the
task's ``train_step``), gradient clipping and the optimizer step. ``step_s - compute_s`` is fairseq's
bookkeeping: batching, logging, metrics, checkpoint and validation checks. The device is synchronized
around each timed part, so timings are exact at the price of a few idle microseconds per update.
Peak memory is read at the end of each timed part and kept here, because fairseq resets the device's
peak counters at every update (for its own ``gb_free``).
"""

import json
import os
import time
from typing import Callable, Optional

import torch


class SpeedLog:
    """Times updates of one training process and appends them to ``path`` as JSON lines."""

    def __init__(self, path: str, device: torch.device):
        self.path = path
        self.device = device
        self._file = None
        self._update = 0
        self._previous_end: Optional[float] = None
        self._compute = 0.0
        self._peaks = {"peak_allocated_bytes": 0, "peak_reserved_bytes": 0}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def timed(self, function: Callable) -> Callable:
        """``function`` wrapped so that its synchronized duration counts as compute of the current update."""
        def run(*args, **kwargs):
            start = self._now()
            try:
                return function(*args, **kwargs)
            finally:
                self._compute += self._now() - start
                self._read_peaks()
        return run

    def _read_peaks(self) -> None:
        if self.device.type == "cuda":
            self._peaks["peak_allocated_bytes"] = max(self._peaks["peak_allocated_bytes"],
                                                      torch.cuda.max_memory_allocated(self.device))
            self._peaks["peak_reserved_bytes"] = max(self._peaks["peak_reserved_bytes"],
                                                     torch.cuda.max_memory_reserved(self.device))

    def begin_update(self) -> None:
        """Mark the start of an update (the first update's step time starts here)."""
        if self._previous_end is None:
            self._previous_end = self._now()
        self._compute = 0.0

    def end_update(self, tokens: int) -> dict:
        """Close the update that processed ``tokens`` input tokens: write and return its record."""
        end = self._now()
        self._update += 1
        record = {"update": self._update, "step_s": end - self._previous_end, "compute_s": self._compute,
                  "tokens": int(tokens)}
        if self.device.type == "cuda":
            record.update(self._peaks)
        self._previous_end = end
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
        self._file.write(json.dumps(record) + "\n")
        return record


def batch_tokens(samples) -> int:
    """Input tokens (padding included) in a list of fairseq samples; empty (dummy) samples count none."""
    return sum(s["net_input"]["input_ids"].numel() for s in samples if s and "net_input" in s)
