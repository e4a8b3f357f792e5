"""The one seam into fairseq's training loop: a Trainer subclass, installed from ``--user-dir`` import.

Each override says which fairseq behaviour it replaces. No other module of fairseq_ext patches fairseq.
"""

import logging
import os
import shutil
import sys

import torch
import torch.distributed as dist
from fairseq import trainer as fairseq_trainer
from fairseq.distributed import ModuleProxyWrapper
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager
from fairseq.logging import progress_bar
from torch.nn.parallel import DistributedDataParallel

from .runtime.zero import shard_optimizer_states

logger = logging.getLogger(__name__)


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


class CubeTrainer(fairseq_trainer.Trainer):
    """fairseq's Trainer with data-parallel CPU runs and checkpoints that are never left half-written."""

    @property
    def model(self):
        """Replaces fairseq's DDP wrapping on CPU hosts, which passes CUDA ``device_ids`` that DDP rejects
        for CPU modules. Same DDP settings otherwise; GPU runs keep fairseq's wrapper."""
        if self._wrapped_model is None and self.use_distributed_wrapper and self.device.type == "cpu":
            dt = self.cfg.distributed_training
            self._wrapped_model = ModuleProxyWrapper(DistributedDataParallel(
                self._model, process_group=self.data_parallel_process_group,
                broadcast_buffers=dt.broadcast_buffers, bucket_cap_mb=dt.bucket_cap_mb,
                find_unused_parameters=dt.find_unused_parameters, gradient_as_bucket_view=dt.gradient_as_bucket_view))
        return super().model

    def _build_optimizer(self):
        """Adds ZeRO-1 (``--use-zero``) to fairseq's optimizer. fairseq's own ``--zero-sharding os`` needs
        fairscale, which is unmaintained: this uses torch's ZeroRedundancyOptimizer, and fairseq's
        ``consolidate_optimizer`` before checkpoints already calls its ``consolidate_state_dict``."""
        super()._build_optimizer()
        task_cfg = self.cfg.task
        if getattr(task_cfg, "use_zero", False) and self.data_parallel_world_size > 1:
            fairseq_optimizer = self._optimizer
            fairseq_optimizer.optimizer = shard_optimizer_states(
                fairseq_optimizer.optimizer, fairseq_optimizer.optimizer_config, task_cfg.zero_n_groups)
            logger.info(f"ZeRO-1: optimizer states sharded among {self.data_parallel_world_size} replicas "
                        f"in {task_cfg.zero_n_groups} group(s)")

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


_fairseq_progress_bar = progress_bar.progress_bar


def progress_bar_once_per_log_file(iterator, *args, log_file=None, **kwargs):
    """Replaces fairseq's progress_bar, which adds a new handler for ``--log-file`` at every epoch and
    validation, so each line was written to the log file once more per epoch. The handler is added once."""
    if log_file is not None and any(getattr(h, "baseFilename", None) == os.path.abspath(log_file)
                                    for h in progress_bar.logger.handlers):
        log_file = None
    return _fairseq_progress_bar(iterator, *args, log_file=log_file, **kwargs)


_fairseq_infer_init_method = distributed_utils.infer_init_method
TORCHRUN_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")


def infer_init_method(cfg, force_distributed=False):
    """Replaces fairseq's launch detection for torchrun on hosts without GPUs.

    fairseq takes the world size from ``--distributed-world-size`` (default: the CUDA device count, so
    1 on a CPU host, which makes every torchrun worker train alone) and the device from ``rank %
    cuda.device_count()`` (a division by zero on a CPU host). Under torchrun both come from the
    environment here: world size, rank, and the local rank as device.
    """
    if (cfg.distributed_init_method is None and all(k in os.environ for k in TORCHRUN_VARIABLES)
            and int(os.environ["WORLD_SIZE"]) > 1):
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = int(os.environ["LOCAL_RANK"]) if torch.cuda.is_available() else 0
        cfg.distributed_no_spawn = True
        return
    _fairseq_infer_init_method(cfg, force_distributed)


def broadcast_object_slow(obj, src_rank, group, dist_device):
    """Replaces fairseq's broadcast of a loaded checkpoint from data-parallel rank 0 to the others, which
    round-trips it through ``torch.load`` and fails on torch >= 2.6 (``weights_only`` refuses fairseq's
    config objects). The object comes from a rank of this same job, so torch's pickle-based
    ``broadcast_object_list`` carries it; checkpoint files themselves are still read by fairseq's loader."""
    objects = [obj if dist.get_rank(group) == src_rank else None]
    dist.broadcast_object_list(objects, group_src=src_rank, group=group, device=dist_device)
    return objects[0]


def install() -> None:
    """Make ``fairseq-train`` build :class:`CubeTrainer`, copy checkpoints atomically, log once and
    launch under torchrun on CPU hosts too (idempotent)."""
    import fairseq_cli.train

    fairseq_cli.train.Trainer = CubeTrainer
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == "fairseq_cli.train":
        main.Trainer = CubeTrainer  # launched as `python -m fairseq_cli.train`: that module runs as __main__
    PathManager.copy = staticmethod(atomic_copy)
    progress_bar.progress_bar = progress_bar_once_per_log_file
    distributed_utils.infer_init_method = infer_init_method
    distributed_utils._broadcast_object_slow = broadcast_object_slow
