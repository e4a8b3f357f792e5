"""The data-parallel part of the cost model: the ZeRO level that acts, what FSDP2 shards and gathers, the
bytes it reduces, and the seconds of its collectives per update (cost.py's docstring has the formulas)."""

from typing import NamedTuple, Optional, Tuple

from .communication_cost import allgather_seconds, allreduce_seconds, link
from .hardware import Hardware
from .plan import Plan
from .runtime.precision import reduce_dtype

FSDP_LAYERS_IN_FLIGHT = 2  # level 3: the layer computing and the one FSDP2 prefetches


def reduce_bytes(precision: str, grad_bytes: int, replicas: int) -> int:
    """Bytes per gradient element FSDP2 reduces over ``replicas`` units under ``precision``: its
    ``reduce_dtype`` (float32 where the precision keeps float32 masters and there is a sum), else the
    gradients' own ``grad_bytes`` (fairseq's --fp16 reduces its fp16 gradients through DDP)."""
    dtype = None if precision == "fp16" else reduce_dtype(precision, replicas)
    return grad_bytes if dtype is None else dtype.itemsize


def zero_level(plan: Plan) -> int:
    """The ZeRO level that acts: 0 without FSDP2 (a single scale unit of several GPUs: nothing to shard across;
    one GPU alone at a level >= 1 runs FSDP2 over one rank, ``Plan.on_fsdp``)."""
    return plan.zero if plan.on_fsdp else 0


def zero_shards(plan: Plan) -> int:
    """S: the replicas each sharded state is split across (CUBE_SCALING_FACTOR / ZERO_N_GROUPS), 1 at level 0."""
    return plan.scaling_factor // plan.zero_n_groups if zero_level(plan) else 1


def unsharded_weights(level: int, weights: int, edge_weights: int) -> float:
    """Parameter elements FSDP2 holds all-gathered from the forward to the end of the backward, beside the
    shards: every weight at levels 1-2; at level 3 the root's (embeddings, norm, head: the root is not
    resharded after its forward); the decoder layers gathered while they run are :func:`layers_in_flight`."""
    if level == 0:
        return 0.0
    return weights if level < 3 else edge_weights


def layers_in_flight(level: int, layer_weights: int, layers: int) -> float:
    """Parameter elements of the decoder layers FSDP2 holds gathered at level 3 while one layer computes:
    that layer and the one it prefetches, in the forward and in the backward."""
    return min(layers, FSDP_LAYERS_IN_FLIGHT) * layer_weights if level == 3 else 0.0


def one_rank_copy_seconds(
    plan: Plan,
    hw: Hardware,
    weight_bytes: float,
    numel: int,
    grad_b: int,
    reduce_b: int,
    passes: int,
    reductions: int,
) -> float:
    """Seconds FSDP2 spends on one rank alone (one GPU at a ZeRO level): each gather copies the shards into
    the gathered weights (read and write), each reduction casts the gradients into the reduce-scatter input
    (read ``grad_b``, write ``reduce_b``), which is its output (``fsdp.OneRankReduceScatter``), and, where the
    reduce dtype differs, casts that to the sharded gradient (read ``reduce_b``, write ``grad_b``); memory bound,
    at ``hw.one_rank_copy_efficiency`` of ``hw.hbm_bandwidth``, not hidden (they compete with the compute for
    memory)."""
    gathers = passes * (2 if plan.zero == 3 else 1)
    per_grad = grad_b + reduce_b + (reduce_b + grad_b if reduce_b != grad_b else 0)
    return (gathers * 2 * weight_bytes + reductions * numel * per_grad) / (
        hw.hbm_bandwidth * hw.one_rank_copy_efficiency
    )


class DataParallelBytes(NamedTuple):
    """What one rank's data-parallel collectives move: its weights (all-gathers) and gradients (reductions)."""

    weights: float
    grads: float


def data_parallel_seconds(
    plan: Plan,
    hw: Hardware,
    volume: DataParallelBytes,
    passes: int,
    compute: float,
    layers: int,
    grad_reductions: Optional[int] = None,
) -> Tuple[float, float]:
    """(all, exposed) seconds of one update's data-parallel communication (see the module docstring).

    Args:
        passes: forward-backward passes of the update (each all-gathers and reduces once; level 0's
            replicas reduce once per update).
        compute: the update's compute seconds the collectives can hide behind.
        layers: FSDP2 units per pass (decoder layers of the rank): one unit's collective never hides.
        grad_reductions: passes whose gradients are reduced (default: every pass; level 1 reduces once).
    """
    level, n = zero_level(plan), plan.scaling_factor
    if n <= 1:
        return 0.0, 0.0
    if level == 0:
        total = allreduce_seconds(volume.grads, n, link(hw, plan.world_size <= hw.gpus_per_node))
        backward = compute / passes * 2 / 3  # the last pass's backward: DDP reduces its buckets as they fill
        return total, max(0.0, total - backward) + total / layers
    shards, groups = zero_shards(plan), plan.zero_n_groups
    shard_link = link(hw, shards * plan.plan_ngpus <= hw.gpus_per_node)
    gathers = 2 if level == 3 else 1
    reductions = passes if grad_reductions is None else grad_reductions
    reduce = allgather_seconds(volume.grads, shards, shard_link)  # a reduce-scatter moves what an all-gather does
    if groups > 1:
        reduce += allreduce_seconds(volume.grads / shards, groups, link(hw, plan.world_size <= hw.gpus_per_node))
    total = passes * gathers * allgather_seconds(volume.weights, shards, shard_link) + reductions * reduce
    return total, max(0.0, total - compute) + total / (passes * layers)
