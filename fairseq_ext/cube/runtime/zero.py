"""ZeRO-1 on fairseq's DDP path: optimizer states sharded among the data-parallel replicas, with PyTorch's
ZeroRedundancyOptimizer (plans on a mesh shard with FSDP2 instead: ``fsdp.py``).

Gradients stay whole (all-reduced over the replicas); each replica steps the optimizer for its share of
the parameters only, holding that share's states (Adam's two moments), then broadcasts the updated
parameters. The replicas of a parameter are the ranks of one data-parallel group: the whole world
without tensor parallel, else the ranks holding the same tensor-parallel shard in each scale unit.
``ZERO_N_GROUPS`` splits each set of replicas into groups of consecutive ranks (by default one group per
node, so the broadcasts stay inside a node); states are sharded inside each group.
"""

import sys
from typing import TYPE_CHECKING, List, Optional, Sequence

import torch
import torch.distributed as dist

from ...errors import UserInputError

if TYPE_CHECKING:
    from torch.distributed.optim import ZeroRedundancyOptimizer

# torch.distributed.optim is imported only by runs that shard with it (0.2 s of every process's start)
ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"


def is_zero_redundancy(optimizer) -> bool:
    """Whether ``optimizer`` is torch's ZeroRedundancyOptimizer (none exists before its module is imported)."""
    module = sys.modules.get(ZERO_MODULE)
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


def zero_group_ranks(world_size: int, num_groups: int) -> List[List[int]]:
    """Split ranks ``0..world_size-1`` into ``num_groups`` groups of consecutive ranks."""
    if num_groups < 1 or world_size % num_groups:
        raise UserInputError(
            f"ZERO_N_GROUPS {num_groups} does not divide the {world_size} data-parallel "
            f"replicas; choose a divisor of {world_size}"
        )
    size = world_size // num_groups
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def shard_optimizer_states(
    torch_optimizer: torch.optim.Optimizer,
    defaults: dict,
    num_groups: int = 1,
    replica_groups: Optional[Sequence[Sequence[int]]] = None,
) -> "ZeroRedundancyOptimizer":
    """Return a ZeRO-1 optimizer stepping like ``torch_optimizer``, its states sharded in this rank's group.

    ``consolidate_state_dict()`` (fairseq calls it before saving) gathers the states on the group's first
    rank (``to`` counts ranks inside the group): the first replica, dp rank 0, which writes checkpoints.

    Args:
        replica_groups: every set of global ranks that hold replicas of the same parameters (the
            data-parallel groups of the mesh), the same list on every rank; default: one set, the world.
    Collective: every rank of the default process group must call it (each creates all the groups).
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if replica_groups is None:
        replica_groups = [list(range(dist.get_world_size()))]
    groups = [
        [replicas[i] for i in local]
        for replicas in replica_groups
        for local in zero_group_ranks(len(replicas), num_groups)
    ]
    process_groups = [dist.new_group(ranks) for ranks in groups]
    mine = next(i for i, ranks in enumerate(groups) if dist.get_rank() in ranks)
    return ZeroRedundancyOptimizer(
        torch_optimizer.param_groups, type(torch_optimizer), process_group=process_groups[mine], **defaults
    )


def local_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Number of optimizer-state elements this rank holds (for ZeRO: only its shard)."""
    inner = optimizer.optim if is_zero_redundancy(optimizer) else optimizer
    return sum(
        value.numel()
        for state in inner.state.values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0
    )
