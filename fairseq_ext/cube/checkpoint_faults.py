"""Checkpoint files that cannot be read or written: one message naming what to do instead.

A checkpoint file cut short (a full disk, a copy interrupted, a node lost while another tool wrote it)
makes torch raise deep inside its zip reader. :func:`unreadable_checkpoint` turns that into one line naming
the newest checkpoint beside it that still reads, and how to resume from it. :func:`failed_save` does the
same for a save that failed (the previous checkpoints are intact: every file is written under a temporary
name and renamed, see ``trainer.py`` and ``sharded_checkpoint.py``).
"""

import os
import re
from typing import Optional, Tuple

from ..errors import UserInputError, one_line
from ..safe_load import load_checkpoint_file

READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError)  # torch's zip reader, a short read
_UPDATES = re.compile(r"checkpoint_\d+_(\d+)\.pt")


def _updates_in(path: str) -> Optional[int]:
    """The update count a readable checkpoint file holds, or None when it does not read."""
    try:
        state = load_checkpoint_file(path, mmap=True)
        return int(state["optimizer_history"][-1]["num_updates"])
    except Exception:  # noqa: BLE001  (any file that does not read is simply not a candidate)
        return None


def newest_intact_checkpoint(save_dir: str, exclude: str) -> Optional[Tuple[str, int]]:
    """(path, updates) of the readable ``*.pt`` file of ``save_dir`` with the most updates, ``exclude`` aside."""
    names = sorted(
        (int(m.group(1)) if (m := _UPDATES.fullmatch(n)) else -1, n) for n in os.listdir(save_dir) if n.endswith(".pt")
    )
    best = None
    for _, name in reversed(names):  # numbered files newest first, then the others
        path = os.path.join(save_dir, name)
        if os.path.abspath(path) == os.path.abspath(exclude):
            continue
        updates = _updates_in(path)
        if updates is not None and (best is None or updates > best[1]):
            best = (path, updates)
    return best


def unreadable_checkpoint(path: str, err: Exception) -> UserInputError:
    """The error for a checkpoint file that exists but does not read."""
    found = newest_intact_checkpoint(os.path.dirname(os.path.abspath(path)), path)
    advice = (
        f"the newest intact checkpoint is {found[0]} (update {found[1]}): to resume from it, copy it over "
        f"{path} (cp {found[0]} {path})"
        if found
        else "no other checkpoint beside it reads: delete it to start the run from the beginning"
    )
    return UserInputError(f"{path} is damaged or cut short ({one_line(err)}); {advice}")


def failed_save(save_dir: str, err: OSError) -> UserInputError:
    """The error for a checkpoint save into ``save_dir`` that failed (no space left, a folder not writable)."""
    return UserInputError(
        f"could not write a checkpoint into {save_dir} ({one_line(err)}); the previous "
        f"checkpoints there are intact: free space on (or fix) that file system and start the same "
        f"command again to resume from the last of them"
    )
