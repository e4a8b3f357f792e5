"""The one seam into fairseq's training loop: a Trainer subclass, installed from ``--user-dir`` import.

Each override says which fairseq behaviour it replaces. No other module of fairseq_ext patches fairseq.
"""

import os
import shutil

from fairseq import trainer as fairseq_trainer
from fairseq.file_io import PathManager


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


class CubeTrainer(fairseq_trainer.Trainer):
    """fairseq's Trainer with checkpoints that are never left half-written."""

    def save_checkpoint(self, filename, extra_state):
        """Replaces fairseq's direct write of ``filename``: write a temporary file, then rename it into place.

        A run killed while saving leaves the previous ``filename`` intact, so it can resume from it.
        """
        if not self.should_save_checkpoint_on_current_rank:
            return None
        tmp = _temporary_name(filename)
        try:
            super().save_checkpoint(tmp, extra_state)
            os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return os.path.abspath(filename)


_fairseq_copy = PathManager.copy


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False):
    """Replaces fairseq's in-place copy of a checkpoint to its other names (checkpoint_last.pt, _best, ...).

    Local destinations get a copy under a temporary name renamed into place; remote ones keep fairseq's copy.
    """
    if PathManager.path_requires_pathmanager(dst_path):
        return _fairseq_copy(src_path, dst_path, overwrite)
    tmp = _temporary_name(dst_path)
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst_path


def install() -> None:
    """Make ``fairseq-train`` build :class:`CubeTrainer` and copy checkpoints atomically (idempotent)."""
    import fairseq_cli.train

    fairseq_cli.train.Trainer = CubeTrainer
    PathManager.copy = staticmethod(atomic_copy)
