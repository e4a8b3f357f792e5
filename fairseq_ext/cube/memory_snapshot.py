"""``MEMORY_SNAPSHOT_UPDATE=N``: a CUDA memory snapshot of update N of a run, to see where its peak goes.

The trainer reads the variable (and ``MEMORY_SNAPSHOT_DIR``, default: run.sh's ``LOG_DIR``) when it starts;
each rank then records the CUDA caching allocator's history (``torch.cuda.memory._record_memory_history``,
Python stacks of every allocation) from its start through update N, writes
``memory_snapshot_rank<R>.pickle`` (open it at https://pytorch.org/memory_viz) and stops recording, so the
updates after N run at full speed. ``scripts/memory_snapshot_summary.py`` lists the tensors alive at the
update's peak, grouped by where they were allocated.
"""

import logging
import os
import pickle
from typing import Optional

import torch

from ..errors import UserInputError

logger = logging.getLogger(__name__)

ENV_UPDATE = "MEMORY_SNAPSHOT_UPDATE"
ENV_DIR = "MEMORY_SNAPSHOT_DIR"
MAX_ENTRIES = 1_000_000  # allocator events kept (a ring buffer): a few updates of a large model


def parse_update(text: str) -> Optional[int]:
    """The update to snapshot, counted from 1, from ``MEMORY_SNAPSHOT_UPDATE``; empty: None.

    Raises:
        UserInputError: anything but a positive integer.
    """
    text = (text or "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserInputError(f"{ENV_UPDATE} takes one update counted from 1, e.g. 4, got {text!r}")
    return int(text)


class MemorySnapshot:
    """Records this rank's CUDA allocations from its creation to the end of update ``update`` and writes them."""

    def __init__(self, update: int, folder: str, rank: int):
        self.update = update
        self.path = os.path.join(folder, f"memory_snapshot_rank{rank}.pickle")
        self._recording = True
        torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")

    def after_update(self, update: int) -> None:
        """Called once update ``update`` returned; at the chosen one, writes the snapshot and stops recording."""
        if update != self.update or not self._recording:
            return
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        snapshot["fairseq_ext"] = {"update": update, "max_memory_allocated": torch.cuda.max_memory_allocated()}
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as handle:
            pickle.dump(snapshot, handle)
        os.replace(tmp, self.path)
        logger.info(f"memory snapshot of update {update}: {self.path}")


def from_environment(default_folder: str, rank: int, cuda: bool) -> Optional[MemorySnapshot]:
    """The snapshot ``MEMORY_SNAPSHOT_UPDATE`` asks for, recording from now on; None when unset.

    Raises:
        UserInputError: a bad ``MEMORY_SNAPSHOT_UPDATE``, or one set for a run without a GPU.
    """
    update = parse_update(os.environ.get(ENV_UPDATE, ""))
    if update is None:
        return None
    if not cuda:
        raise UserInputError(f"{ENV_UPDATE} records CUDA allocations: unset it for a run without a GPU")
    folder = os.environ.get(ENV_DIR) or os.environ.get("FAIRSEQ_EXT_LOG_DIR") or default_folder
    return MemorySnapshot(update, folder, rank)
