"""Replacements for fairseq functions that misbehave here; :func:`fairseq_ext.cube.trainer.install` puts them
in place (the one seam into fairseq), this module only defines them.

- ``progress_bar``: adds a ``--log-file`` handler at every epoch (each line logged once more per epoch);
- ``infer_init_method``: a torchrun launch on a host without GPUs (world size 1, division by zero);
- ``_broadcast_object_slow``: the broadcast of a loaded checkpoint, which fails on torch >= 2.6;
- ``broadcast``: the broadcast of a loaded checkpoint's tensors, which names the source by its global rank
  where fairseq's callers mean its rank in the group (the same only in the world group).
- ``distributed_init``: creates the process group without a timeout (``--collective-timeout`` is set first).
"""

import os

import torch
import torch.distributed as dist
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import progress_bar

from .. import errors
from . import collective_timeout

_fairseq_progress_bar = progress_bar.progress_bar


def progress_bar_once_per_log_file(iterator, *args, log_file=None, **kwargs):
    """Replaces fairseq's progress_bar, which adds a new handler for ``--log-file`` at every epoch and
    validation, so each line was written to the log file once more per epoch. The handler is added once."""
    if log_file is not None and any(
        getattr(h, "baseFilename", None) == os.path.abspath(log_file) for h in progress_bar.logger.handlers
    ):
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
    if (
        cfg.distributed_init_method is None
        and all(k in os.environ for k in TORCHRUN_VARIABLES)
        and int(os.environ["WORLD_SIZE"]) > 1
    ):
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


def broadcast_in_group(tensor, src, group):
    """Replaces fairseq's tensor broadcast, whose callers (the broadcast of a loaded checkpoint from the first
    rank of the data-parallel group) give ``src`` as the rank in ``group``, as its rank checks do, while it
    passes it to torch as a global rank: a group without global rank 0 (the second data-parallel group of a
    tensor- or pipeline-parallel plan) failed."""
    dist.broadcast(tensor, group_src=src, group=group)


_fairseq_distributed_init = distributed_utils.distributed_init


def distributed_init(cfg):
    """Replaces fairseq's process-group setup, which passes no timeout: every group of the run (the world,
    fairseq's, the mesh's, ZeRO's) waits ``--collective-timeout`` seconds (COLLECTIVE_TIMEOUT) in a collective,
    and a collective that waits longer ends the run with one line naming the rank that stopped answering."""
    seconds = float(getattr(getattr(cfg, "task", None), "collective_timeout", collective_timeout.DEFAULT_SECONDS))
    if not seconds > 0:
        raise errors.UserInputError(
            f"COLLECTIVE_TIMEOUT (--collective-timeout) must be a positive number of seconds, got {seconds:g}"
        )
    collective_timeout.set_default_timeout(seconds)
    errors.explain_with(collective_timeout.timeout_message)
    return _fairseq_distributed_init(cfg)
