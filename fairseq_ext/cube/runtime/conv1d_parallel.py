"""Tensor-parallel styles for transformers' ``Conv1D`` (GPT-2's projections) and for fused q/k/v projections.

``Conv1D`` is a linear layer with its weight transposed: weight ``(in, out)``, ``forward = addmm(bias, x,
weight)``, so torch's ``ColwiseParallel`` / ``RowwiseParallel`` (``nn.Linear`` and ``nn.Embedding`` only)
do not apply. These styles shard it the same way (colwise: the output features, replicated input;
rowwise: the input features, output all-reduced) and leave its forward unchanged: the module computes on
DTensors, whose shapes are global, so ``Conv1D``'s own ``view(..., nf)`` still holds.

A fused projection packs ``parts`` projections side by side on its output features (GPT-2's ``c_attn``:
``[q | k | v]``). A plain column shard would give rank 0 all of q and half of k; ``parts=3`` places the
weight as ``_StridedShard(split_factor=3)``: each rank holds its ``1/tp`` of each part (``[q_r | k_r | v_r]``,
its own heads), while ``full_tensor()`` is still the single-process ``[q | k | v]``, so checkpoints, the
global gradient norm and the optimizer's local shards need nothing special.
"""

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.placement_types import _StridedShard
from transformers.pytorch_utils import Conv1D

from ...errors import UserInputError


def output_dim(module: nn.Module) -> int:
    """The weight dim of the output features: 1 for ``Conv1D`` ``(in, out)``, 0 for ``nn.Linear`` ``(out, in)``."""
    if isinstance(module, Conv1D):
        return 1
    if isinstance(module, nn.Linear):
        return 0
    raise UserInputError(
        f"a fused q/k/v projection must be nn.Linear or transformers' Conv1D, "
        f"got {type(module).__name__}; register its module type with fairseq_ext.cube.custom"
    )


def _distribute_parameter(module: nn.Module, name: str, mesh: DeviceMesh, placement, src_data_rank) -> None:
    param = getattr(module, name)
    shards = distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank)
    module.register_parameter(name, nn.Parameter(shards, requires_grad=param.requires_grad))


class PackedColwiseParallel(ColwiseParallel):
    """Column-wise split of a ``Conv1D`` or ``nn.Linear`` whose output packs ``parts`` equal projections.

    The input is replicated (its gradient all-reduced in backward); the output is this rank's local
    features, ``parts`` slices of ``out / (parts * tp)`` each (``(B, T, 3H/tp)`` for ``[q_r | k_r | v_r]``).
    Each part's width must be divisible by the tp degree.
    """

    def __init__(self, parts: int = 1):
        super().__init__()
        self.parts = parts

    def _placement(self, dim: int):
        return Shard(dim) if self.parts == 1 else _StridedShard(dim, split_factor=self.parts)

    def _partition_fn(self, name, module, device_mesh):
        _distribute_parameter(module, "weight", device_mesh, self._placement(output_dim(module)), self.src_data_rank)
        if getattr(module, "bias", None) is not None:
            _distribute_parameter(module, "bias", device_mesh, self._placement(0), self.src_data_rank)

    @staticmethod
    def _local_output(mod, outputs: DTensor, device_mesh):
        # Sharded on the last dim (strided when packed): the local tensor is exactly this rank's features,
        # in the order its own consumer (the attention's split of q, k and v) expects.
        return outputs.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            self._partition_fn,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            self._local_output,
        )


class Conv1DRowwiseParallel(RowwiseParallel):
    """Row-wise split of a ``Conv1D``: weight rows (input features) sharded, bias replicated; the input is
    the local last-dim shard, the output is all-reduced (replicated)."""

    def _partition_fn(self, name, module, device_mesh):
        _distribute_parameter(module, "weight", device_mesh, Shard(0), self.src_data_rank)
        _distribute_parameter(module, "bias", device_mesh, Replicate(), self.src_data_rank)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module,
            device_mesh,
            self._partition_fn,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )
