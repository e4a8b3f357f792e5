"""The device mesh of a Plan: axes (dp, pp, tp), tensor parallel fastest.

Rank layout: rank = (dp * pp_size + pp) * tp_size + tp. Ranks of one tp group are adjacent, so with
tp <= GPUs per node a tp group stays inside a node (tensor parallel talks most); pipeline stages come
next, and whole scale units (PLAN_NGPUS ranks each) are data parallel to each other.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fairseq_ext.cube.plan import Plan

DP, PP, TP = "dp", "pp", "tp"
MESH_AXES = (DP, PP, TP)


def backend_for(device_type: str) -> str:
    """The torch.distributed backend for a device type: nccl for cuda, gloo for cpu."""
    backends = {"cuda": "nccl", "cpu": "gloo"}
    if device_type not in backends:
        raise ValueError(f"no distributed backend for device type {device_type!r}; use one of {sorted(backends)}")
    return backends[device_type]


def build_mesh(plan: Plan, device_type: Optional[str] = None) -> DeviceMesh:
    """Build the (dp, pp, tp) mesh of shape (scaling_factor, pp, tp) over all ranks.

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
    return init_device_mesh(device_type, (plan.scaling_factor, plan.pp, plan.tp), mesh_dim_names=MESH_AXES)
