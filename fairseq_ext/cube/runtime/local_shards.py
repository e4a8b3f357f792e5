"""The optimizer's view of a tensor-parallel model: each rank's local shards as plain tensors.

Tensor parallel leaves some parameters as DTensors (sharded over the tp axis) and others plain
(replicated: norms, and the embeddings unless vocab parallel). Optimizers, fairseq's gradient scaling
(``torch._foreach_mul_`` over all grads) and ZeroRedundancyOptimizer's parameter broadcasts want plain
tensors of one kind. :class:`LocalShards` hands them the local shard of every parameter: a plain tensor
sharing storage with the DTensor's local tensor, so an in-place optimizer step updates the model.
Gradients are linked the same way after backward (:meth:`LocalShards.link_grads`).

It also knows which shards make up one full tensor, so it computes the global gradient norm, and turns
optimizer states into full tensors (checkpoint on one rank) and back into local shards (load).
"""

from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the same storage), or the tensor itself."""
    if isinstance(tensor, DTensor):
        with torch.no_grad():  # to_local() then returns the DTensor's own local tensor, not a copy
            return tensor.to_local()
    return tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor split over some mesh axis (not replicated on all of them)."""
    return isinstance(tensor, DTensor) and any(not isinstance(p, Replicate) for p in tensor.placements)


def full_tensor(tensor):
    """Gather a DTensor into the full tensor (collective over its mesh); other values pass through."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(state: Dict[str, object]) -> Dict[str, object]:
    """A module state_dict with every DTensor gathered (collective: every rank of the mesh must call it)."""
    return {key: full_tensor(value) for key, value in state.items()}


def localize_state_dict(module: torch.nn.Module, state: Dict[str, object]) -> Dict[str, object]:
    """A full-tensor state_dict made loadable into ``module``'s DTensor parameters.

    Each entry whose parameter or buffer in ``module`` is a DTensor becomes a DTensor with the same mesh
    and placements, cut locally from the full tensor every rank holds (no communication).
    """
    targets = module.state_dict(keep_vars=True)  # keyed as ``state``, wrapper prefixes removed
    out = dict(state)
    for key, value in state.items():
        target = targets.get(key)
        if isinstance(target, DTensor) and torch.is_tensor(value) and not isinstance(value, DTensor):
            full = value.to(device=target.device, dtype=target.dtype)
            out[key] = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    return out


class LocalShards:
    """Maps a model's parameters (DTensor or plain) to the plain local tensors an optimizer steps.

    Args:
        params: the model's trainable parameters, in the optimizer's order.
        pipeline_group: with pipeline parallel, the group of the ranks that hold the other stages
            (disjoint parameters): the squares of the gradient norm are summed over it too.
    Invariant relied on: every rank of a tensor-parallel group holds the same list, in the same order,
    with the same placements (they ran the same ``parallelize``).
    """

    def __init__(self, params: Iterable[torch.Tensor], pipeline_group=None):
        self.pipeline_group = pipeline_group
        self.params: List[torch.Tensor] = list(params)
        self.views: List[torch.Tensor] = [local_tensor(p) for p in self.params]
        self._param_of_view = {id(v): p for v, p in zip(self.views, self.params)}

    def param_of(self, view: torch.Tensor) -> torch.Tensor:
        """The model parameter whose local shard ``view`` is."""
        return self._param_of_view[id(view)]

    def link_grads(self) -> None:
        """Point each local view's ``.grad`` at the local shard of its parameter's gradient (no copy)."""
        for param, view in zip(self.params, self.views):
            if view is param:
                continue
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                # e.g. a vocab-parallel embedding's gradient arrives as Partial sums on every rank
                grad = param.grad = grad.redistribute(param.device_mesh, param.placements)
            view.grad = None if grad is None else local_tensor(grad)

    def local_grads(self) -> List[torch.Tensor]:
        """The local gradient shards present, in parameter order."""
        return [local_tensor(p.grad) for p in self.params if p.grad is not None]

    def grad_norm(self, views: Optional[Iterable[torch.Tensor]] = None) -> torch.Tensor:
        """The L2 norm of the full gradient of the whole model, the same on every rank, as a 0-dim float32 tensor
        on the gradients' device, computed without waiting for the device (no value is read on the host).

        Squares of sharded gradients are summed over the mesh dims they are split over (each element
        counted once); replicated gradients are counted once, from the local copy. Each local gradient's norm
        is taken in float32 (one multi-tensor launch per kind of split), their squares summed in float64.

        Args:
            views: the local views whose gradients count (default: all).
        """
        params = self.params if views is None else [self.param_of(v) for v in views]
        # Local gradients per (mesh, mesh dims the gradient is split over): tp; dp (FSDP2); dp and tp.
        by_split: Dict[tuple, List[torch.Tensor]] = {}
        for param in params:
            if param.grad is None:
                continue
            key = (None, ())
            if is_sharded(param.grad):
                placements = param.grad.placements
                key = (param.grad.device_mesh, tuple(d for d, p in enumerate(placements) if not p.is_replicate()))
            by_split.setdefault(key, []).append(local_tensor(param.grad).detach())
        device = next(iter(by_split.values()))[0].device if by_split else self._device()
        total_sq = torch.zeros((), dtype=torch.float64, device=device)
        for (mesh, dims), grads in by_split.items():  # the same keys, in the same order, on the ranks of a mesh
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            square = torch.stack(norms).double().square().sum()
            if mesh is not None:
                for dim in dims:
                    dist.all_reduce(square, group=mesh.get_group(dim))
            total_sq = total_sq + square.to(device)
        if self.pipeline_group is not None and views is None:
            dist.all_reduce(total_sq, group=self.pipeline_group)  # each stage's parameters counted once
        return total_sq.sqrt().float()

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def full_optimizer_state(self, state_dict: dict, views: List[torch.Tensor]) -> dict:
        """An optimizer state_dict whose per-parameter tensors are gathered into full tensors.

        Args:
            state_dict: ``optimizer.state_dict()`` (states keyed by index into ``views``).
            views: the optimizer's parameters in state_dict order (its param_groups, flattened).
        Collective over each sharded parameter's mesh, in parameter order.
        """
        out = dict(state_dict)
        out["state"] = {}
        for index, state in state_dict["state"].items():
            param = self.param_of(views[index])
            out["state"][index] = {name: self._full_like(param, value) for name, value in state.items()}
        return out

    def local_optimizer_state(self, state_dict: dict, views: List[torch.Tensor]) -> dict:
        """The inverse of :meth:`full_optimizer_state`: cut each full per-parameter tensor to the local shard."""
        out = dict(state_dict)
        out["state"] = {}
        for index, state in state_dict["state"].items():
            param = self.param_of(views[index])
            out["state"][index] = {name: self._local_like(param, value) for name, value in state.items()}
        return out

    @staticmethod
    def _full_like(param, value):
        if (
            isinstance(param, DTensor)
            and torch.is_tensor(value)
            and value.shape == local_tensor(param).shape
            and value.dim() > 0
        ):
            return DTensor.from_local(
                value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            ).full_tensor()
        return value

    @staticmethod
    def _local_like(param, value):
        if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0:
            return distribute_tensor(
                value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
        return value
