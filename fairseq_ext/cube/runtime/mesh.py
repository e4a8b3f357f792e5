"""The device mesh of a Plan: axes (dp_replicate, dp_shard, pp, tp), tensor parallel fastest, and dp,
the two data-parallel axes flattened into one.

Rank layout: rank = (dp * pp_size + pp) * tp_size + tp with dp = dp_replicate * dp_shard_size + dp_shard.
Ranks of one tp group are adjacent, so with tp <= GPUs per node a tp group stays inside a node (tensor
parallel talks most); pipeline stages come next, and whole scale units (PLAN_NGPUS ranks each) are data
parallel to each other: the training state is sharded among the consecutive units of one dp_shard group
(ZeRO) and replicated across the groups (``Plan.dp_shard``, ``Plan.dp_replicate``).
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fairseq_ext.cube.plan import Plan

DP, PP, TP = "dp", "pp", "tp"
DP_REPLICATE, DP_SHARD = "dp_replicate", "dp_shard"
MESH_AXES = (DP_REPLICATE, DP_SHARD, PP, TP)
DATA_PARALLEL_AXES = (DP_REPLICATE, DP_SHARD, DP)  # the dims FSDP2 shards over (data_parallel_mesh)


def backend_for(device_type: str) -> str:
    """The torch.distributed backend for a device type: nccl for cuda, gloo for cpu."""
    backends = {"cuda": "nccl", "cpu": "gloo"}
    if device_type not in backends:
        raise ValueError(f"no distributed backend for device type {device_type!r}; use one of {sorted(backends)}")
    return backends[device_type]


def init_one_process_group(device_type: str) -> None:
    """torch.distributed for a run of one process, which fairseq starts without it: a group of one rank over
    an in-memory store (no address, no port), so that a plan on a mesh (FSDP2 at a ZeRO level on one GPU)
    runs alone too. Nothing when a group exists already."""
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device_type), store=dist.HashStore(), rank=0, world_size=1)


def build_mesh(plan: Plan, device_type: Optional[str] = None) -> DeviceMesh:
    """Build the (dp_replicate, dp_shard, pp, tp) mesh over all ranks, with the axis dp of shape
    scaling_factor flattened from the first two.

    Collective: every rank must call it. Requires ``torch.distributed`` to be initialized (with
    ``backend_for(device_type)``); raises UserInputError in every rank when the plan's world size
    differs from the process group's.

    Args:
        device_type: "cuda" or "cpu"; default "cuda" when CUDA is available, else "cpu".
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs torch.distributed initialized first: "
            "dist.init_process_group(backend_for(device_type)), e.g. under torchrun"
        )
    plan.check_world_size(dist.get_world_size())
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (plan.dp_replicate, plan.dp_shard, plan.pp, plan.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_AXES)
    mesh[DP_REPLICATE, DP_SHARD]._flatten(DP)
    return mesh


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards the training state over: dp_shard alone, or (dp_replicate, dp_shard) for hybrid
    sharding (shard inside a group, replicate across groups)."""
    if mesh[DP_REPLICATE].size() == 1:
        return mesh[DP_SHARD]
    return mesh[DP_REPLICATE, DP_SHARD]
