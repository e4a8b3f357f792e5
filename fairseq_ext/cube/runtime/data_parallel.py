"""Data parallel between scale units: gradients reduced over the mesh's dp axis only.

DistributedDataParallel cannot wrap a tensor-parallel model (its parameters are DTensors and its
replicas are the ranks of one dp group, not the whole world), so gradients are reduced explicitly
after the last backward of an update, in one flat all-reduce per dtype.
"""

from typing import List

import torch
import torch.distributed as dist


def average_gradients(grads: List[torch.Tensor], group) -> None:
    """Replace each gradient by its mean over the ranks of ``group``, in place.

    Summed over the group, then divided by its size: the convention of DDP, which fairseq's
    ``multiply_grads(dp_size / sample_size)`` undoes, giving (sum of all gradients) / (global sample size).
    """
    size = dist.get_world_size(group)
    if size == 1 or not grads:
        return
    by_dtype = {}
    for grad in grads:
        by_dtype.setdefault((grad.device, grad.dtype), []).append(grad)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for grad in same:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
