"""Data parallel between scale units with FSDP2 (``torch.distributed.fsdp.fully_shard``) at the plan's ZeRO level.

Each repeated block (Hugging Face's ``_no_split_modules``: the decoder layers) is sharded on its own and
the root (the whole model, or each pipeline stage) holds what is left (embeddings, final norm, head), so
FSDP2 gathers one block's weights at a time and prefetches the next. The data-parallel mesh comes from
``mesh.data_parallel_mesh``: the units of one dp_shard group share one copy of the training state,
dp_replicate groups hold copies of it (hybrid sharding). Tensor parallel happens first: its DTensors
become 2-D (dp, tp) shards.

The ZeRO levels (``Plan.zero``):

- 0: the dp_shard groups have one unit each, so every unit keeps weights, gradients and optimizer states
  whole; gradients are all-reduced once per update (batches accumulated by ``--update-freq`` add up locally).
- 1: gradients and optimizer states are sharded; weights are gathered for the forward and kept until the
  backward; accumulated batches add up in whole local gradients, reduce-scattered once per update.
- 2: as 1, but each batch's gradients are reduce-scattered at once (only shards accumulate).
- 3: as 2, and each block's weights are freed after its forward and gathered again in the backward.

Gradients are averaged over the units (FSDP2's reduction), the convention fairseq's
``multiply_grads(dp_size / sample_size)`` expects of DDP; with bf16 weights and float32 masters
(``bf16-master``) they are summed in float32 and rounded to bf16 once, after the sum
(``precision.reduce_dtype``: FSDP2's ``MixedPrecisionPolicy(reduce_dtype=float32)``; the weights stay bf16
and the optimizer's master step runs on each rank's local shards).

One GPU alone at a ZeRO level (``Plan.on_fsdp``) runs this over a mesh of one rank: FSDP2 then copies where
it would gather, and levels 1 and 2 keep a gathered copy of the weights beside the shards. Its reductions
hand the gradients over in place (:class:`OneRankReduceScatter`).
"""

import contextlib
import logging
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from ..plan import Plan
from .compile_layers import repeated_block_classes

logger = logging.getLogger(__name__)

# Levels whose accumulated batches keep whole local gradients, reduced once per update.
_REDUCE_ONCE_PER_UPDATE = (0, 1)


class OneRankReduceScatter(ReduceScatter):
    """FSDP2's reduce-scatter over a mesh of one rank, where the reduced shard is the whole input: the output
    buffer FSDP2 asks for right after an input of the same size (on an accelerator: from its reduce-scatter
    stream, not the input's) is that input, so FSDP2's copy from input to output copies a tensor onto itself,
    which torch skips. One instance per FSDP2 module (it pairs the two requests of one reduction)."""

    def __init__(self):
        self._input: Optional[torch.Tensor] = None
        self._input_stream = None

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The input's buffer for the output request of the same reduction, else a new buffer (an input)."""
        given, self._input = self._input, None
        stream = None if device.type == "cpu" else torch.get_device_module(device.type).current_stream(device)
        if (
            given is not None
            and (stream is None or stream != self._input_stream)
            and (tuple(given.shape), given.dtype, given.device) == (tuple(size), dtype, device)
        ):
            if stream is not None:
                given.record_stream(stream)  # FSDP2 reads the output there (accumulation) after it lets it go
            return given
        self._input, self._input_stream = torch.empty(size, dtype=dtype, device=device), stream
        return self._input

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        if output_tensor is input_tensor:
            return None
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def _block_modules(root: torch.nn.Module, classes: set) -> List[torch.nn.Module]:
    """The outermost submodules of ``root`` whose class (or, for a recompute wrapper, whose wrapped module's
    class) is a repeated block, in module order."""
    blocks, inside = [], set()
    for name, module in root.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside):
            continue
        inner = getattr(module, "_checkpoint_wrapped_module", module)
        if type(inner).__name__ in classes:
            blocks.append(module)
            inside.add(name)
    return blocks


def shard_data_parallel(
    roots: List[torch.nn.Module],
    hf_model,
    plan: Plan,
    dp_mesh: DeviceMesh,
    reduce_dtype: Optional[torch.dtype] = None,
) -> int:
    """``fully_shard`` the repeated blocks of each of ``roots`` and then each root, in place, at ``plan.zero``.

    Args:
        roots: the modules whose forward the training calls (the whole model, or this rank's pipeline stages).
        hf_model: the Hugging Face model, which names its repeated blocks.
        dp_mesh: ``mesh.data_parallel_mesh(mesh)``.
        reduce_dtype: the dtype gradients are summed over the replicas in (``precision.reduce_dtype``); None:
            their own.
    Returns:
        the number of blocks sharded on their own.
    Collective: every rank of the mesh calls it with the same modules.
    """
    classes = repeated_block_classes(hf_model)
    reshard_blocks = plan.zero == 3
    policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    count = 0
    sharded = []
    for root in roots:
        for block in _block_modules(root, classes):
            sharded.append(fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_blocks, mp_policy=policy))
            count += 1
        # the root is gathered again at once
        sharded.append(fully_shard(root, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy))
    if dp_mesh.size() == 1:
        for module in sharded:
            module.set_custom_reduce_scatter(OneRankReduceScatter())
    kind = "hybrid sharding" if plan.dp_replicate > 1 and plan.dp_shard > 1 else "sharding"
    logger.info(
        f"data parallel (FSDP2, ZeRO {plan.zero}): {count} blocks and {len(roots)} root(s) over "
        f"{plan.scaling_factor} scale units, {kind} {plan.dp_replicate} x {plan.dp_shard} (replicate x shard)"
        + (f", gradients summed in {str(reduce_dtype).removeprefix('torch.')}" if reduce_dtype is not None else "")
    )
    return count


def accumulation_without_sync(roots: List[torch.nn.Module], plan: Plan):
    """A context manager factory for the batches of an update before its last (fairseq's ``no_sync``): at
    levels 0 and 1 their gradients add up locally and are reduced with the last batch's; None at levels 2
    and 3, whose every batch is reduce-scattered at once."""
    if plan.zero not in _REDUCE_ONCE_PER_UPDATE:
        return None

    @contextlib.contextmanager
    def no_sync():
        for root in roots:
            root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for root in roots:
                root.set_requires_gradient_sync(True)

    return no_sync
