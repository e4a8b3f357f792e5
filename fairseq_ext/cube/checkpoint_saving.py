"""How the cube trainer writes and reads checkpoints (a mixin of :class:`~fairseq_ext.cube.trainer.CubeTrainer`),
and the replacements of fairseq's checkpoint functions that :func:`~fairseq_ext.cube.trainer.install` puts in place.

Checkpoints (``--checkpoint-format``) are fairseq's one file with full tensors, gathered from every
shard and stage on the first rank (``full``), or fairseq's files kept small beside a folder into which
every rank writes its own shards with torch.distributed.checkpoint (``dcp``, the default for plans on a
mesh; ``sharded_checkpoint.py``). Both load under any plan and world size. Every file is written under a
temporary name and renamed into place.
"""

import logging
import os
import shutil

from fairseq import checkpoint_utils, utils
from fairseq.file_io import PathManager
from fairseq.logging import metrics
from omegaconf import OmegaConf

from ..errors import UserInputError
from .checkpoint_faults import failed_save
from .config import checkpoint_format
from .finished_run import stop_if_complete
from .runtime.mesh import PP, TP
from .sharded_checkpoint import (
    SHARDS_KEY,
    check_shared_save_dir,
    has_strided_shards,
    model_entries,
    optimizer_entries,
    optimizer_record,
    remove_unreferenced_shards,
    shards_left_on_disk,
    shards_record,
    write_shards,
)

logger = logging.getLogger(__name__)


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


class CheckpointSaving:
    """The checkpoint part of the cube trainer (mixed into it before fairseq's Trainer): reads the trainer's
    ``mesh``, ``data_parallel_roots``, ``checkpoint_format``, ``_shards_folder``, ``_full_param_names`` and
    ``_check_previous_norm``."""

    def _checkpoint_format(self, cfg, model) -> str:
        """``--checkpoint-format`` resolved for this plan, and what a sharded checkpoint cannot hold refused."""
        resolved = checkpoint_format(cfg.task, self.mesh is not None)
        if resolved == "dcp" and has_strided_shards(model):
            if getattr(cfg.task, "checkpoint_format", "auto") == "dcp":
                raise UserInputError(
                    "--checkpoint-format dcp cannot write this model's fused q/k/v shards (GPT-2 "
                    "style, each rank its heads of q, k and v); use --checkpoint-format full "
                    "(CHECKPOINT_FORMAT=full) or auto"
                )
            resolved = "full"  # auto: gathered on the first rank, as for one process
        if resolved == "dcp" and cfg.ema.store_ema:
            raise UserInputError(
                "--store-ema keeps a full copy of the model in the checkpoint; use "
                "--checkpoint-format full (CHECKPOINT_FORMAT=full) with it"
            )
        if resolved == "dcp" and PathManager.path_requires_pathmanager(cfg.checkpoint.save_dir):
            raise UserInputError(
                f"--checkpoint-format dcp writes to local folders; --save-dir "
                f"{cfg.checkpoint.save_dir} is remote: use --checkpoint-format full"
            )
        if resolved == "dcp" and not cfg.checkpoint.no_save:
            check_shared_save_dir(cfg.checkpoint.save_dir)
        logger.info(f"checkpoints: {resolved} (--checkpoint-format {getattr(cfg.task, 'checkpoint_format', 'auto')})")
        return resolved

    @property
    def should_save_checkpoint_on_current_rank(self) -> bool:
        """Replaces "every rank of dp rank 0 writes" (all tp ranks of the first unit, racing on one file):
        only the first rank of the mesh writes; the others of its unit join the gathers (next property)."""
        if self.mesh is None:
            return super().should_save_checkpoint_on_current_rank
        return self.data_parallel_rank == 0 and self.mesh.get_local_rank(TP) == 0 and self.mesh.get_local_rank(PP) == 0

    @property
    def always_call_state_dict_during_save_checkpoint(self) -> bool:
        """The ranks of the first scale unit build the state dict (its gathers are collective over tp), every
        rank when FSDP2 shards the model over the units; with sharded checkpoints nobody needs to (the shards
        are written before, by every rank)."""
        if self.mesh is None or self.checkpoint_format == "dcp":
            return super().always_call_state_dict_during_save_checkpoint
        return bool(self.data_parallel_roots) or self.data_parallel_rank == 0

    @property
    def writes_shards(self) -> bool:
        """Whether checkpoints are sharded: :func:`save_checkpoint_with_shards` then calls :meth:`write_shards`."""
        return self.checkpoint_format == "dcp"

    def write_shards(self, save_dir: str) -> None:
        """Every rank writes its shards of the model and optimizer into a new DCP folder in ``save_dir``
        (collective); the checkpoint files fairseq writes next (:meth:`state_dict`) name that folder."""
        state = model_entries(self._model)
        if not self.cfg.checkpoint.no_save_optimizer_state:
            state.update(optimizer_entries(self.optimizer.optimizer, self._optimizer_params()))
        self._shards_folder = write_shards(save_dir, state, self.get_num_updates())
        if self.should_save_checkpoint_on_current_rank:
            logger.info(f"model and optimizer shards written to {os.path.join(save_dir, self._shards_folder)}")

    def checkpoint_saved(self, save_dir: str) -> None:
        """After fairseq's save (files written, copied, old ones deleted): forget the folder just written and
        delete the shards folders no checkpoint file names any more."""
        self._shards_folder = None
        if self.should_save_checkpoint_on_current_rank:
            for name in remove_unreferenced_shards(save_dir):
                logger.info(f"removed {os.path.join(save_dir, name)} (no checkpoint file names it)")

    def consolidate_optimizer(self):
        """Replaces fairseq's gather of ZeRO-1's optimizer states on the first rank before a save: a sharded
        checkpoint writes them where they are."""
        if self.checkpoint_format == "dcp":
            return
        super().consolidate_optimizer()

    def state_dict(self):
        """Replaces fairseq's checkpoint content for a sharded checkpoint: fairseq's entries (cfg, optimizer
        history with the LR scheduler, task state, metrics, training time) without the model and optimizer
        tensors, which are in the folder :meth:`write_shards` wrote; ``dcp`` names it."""
        if self._shards_folder is None:
            return super().state_dict()
        optimizer = None
        if not self.cfg.checkpoint.no_save_optimizer_state:
            optimizer = optimizer_record(self.optimizer, self._full_param_names)
        return {
            "args": None,
            "cfg": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)
            if OmegaConf.is_config(self.cfg)
            else self.cfg,
            "criterion": self.criterion.state_dict() if utils.has_parameters(self.criterion) else None,
            "optimizer_history": (self._optim_history or [])
            + [
                {
                    "criterion_name": self.get_criterion().__class__.__name__,
                    "optimizer_name": self.optimizer.__class__.__name__,
                    "lr_scheduler_state": self.lr_scheduler.state_dict(),
                    "num_updates": self.get_num_updates(),
                }
            ],
            "task_state": self.task.state_dict() if self.task is not None else {},
            "extra_state": {"metrics": metrics.state_dict(), "previous_training_time": self.cumulative_training_time()},
            SHARDS_KEY: shards_record(self._shards_folder, optimizer),
        }

    def load_checkpoint(self, filename, *args, **kwargs):
        """Replaces fairseq's read of a whole checkpoint by the first rank of each dp group, for a sharded
        checkpoint under a plan on a mesh: that rank reads only the small file, then the model and the
        optimizer read each rank's shards from its folder (``dcp.load`` reshards them to this plan).
        Without a mesh, a sharded checkpoint is read into full tensors like a full one."""
        if self.mesh is None:
            extra_state = super().load_checkpoint(filename, *args, **kwargs)
        else:
            with shards_left_on_disk():
                extra_state = super().load_checkpoint(filename, *args, **kwargs)
        if extra_state is not None:  # a finished run trains nothing (finished_run.py)
            stop_if_complete(self.get_num_updates(), self.cfg.optimization.max_update, filename)
        return extra_state

    def save_checkpoint(self, filename, extra_state):
        """Replaces fairseq's direct write of ``filename``: write a temporary file, then rename it into place.

        A run killed while saving leaves the previous ``filename`` intact, so it can resume from it. The
        last update's gradient norm is checked first: a checkpoint never holds an update that failed.
        """
        self._check_previous_norm()
        if not self.should_save_checkpoint_on_current_rank:
            return None
        tmp = _temporary_name(filename)
        try:
            super().save_checkpoint(tmp, extra_state)
            os.replace(tmp, filename)
        finally:
            for leftover in (tmp, tmp + ".tmp"):  # fairseq's own save writes to "<name>.tmp" first
                if os.path.exists(leftover):
                    os.remove(leftover)
        return os.path.abspath(filename)


_fairseq_copy = PathManager.copy


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False):
    """Replaces fairseq's in-place copy of a checkpoint to its other names (checkpoint_last.pt, _best, ...).

    Local destinations get a copy under a temporary name renamed into place; remote ones keep fairseq's copy.
    The copy of a sharded checkpoint's small file names the same shards folder: the folder is shared, and
    removed once no file names it (:func:`save_checkpoint_with_shards`).
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


_fairseq_save_checkpoint = checkpoint_utils.save_checkpoint


def save_checkpoint_with_shards(cfg, trainer, epoch_itr, val_loss):
    """Replaces fairseq's checkpoint save (its ``checkpoint_utils.save_checkpoint``) for sharded checkpoints.

    fairseq's save writes on the first rank only. With sharded checkpoints every rank first writes its
    shards into a new DCP folder (collective); then fairseq's save runs as usual: its files under its
    names (small, naming that folder), the copies to its other names and the deletion of old ones
    (``--keep-*``). Last, in either format, the shards folders no file names any more are deleted.
    """
    try:  # a failed save is one message, earlier checkpoints intact (checkpoint_faults.py)
        if not cfg.no_save and getattr(trainer, "writes_shards", False):
            trainer.write_shards(cfg.save_dir)
        result = _fairseq_save_checkpoint(cfg, trainer, epoch_itr, val_loss)
    except OSError as err:
        raise failed_save(cfg.save_dir, err) from err
    if not cfg.no_save and hasattr(trainer, "checkpoint_saved"):
        trainer.checkpoint_saved(cfg.save_dir)  # also after a full save, which may replace a sharded one
    return result
