"""The optimizer's sharded view under a plan on a mesh: what :class:`~fairseq_ext.cube.trainer.CubeTrainer`
adds to fairseq's optimizer (a mixin of it).

With tensor parallel the optimizer steps each rank's local shards (plain tensors sharing storage with the
model's DTensors); its ``state_dict`` gives full tensors, keyed like the single-process model's optimizer
(the stages of a pipeline gathered and merged), and ``load_state_dict`` takes them back, or a sharded
checkpoint's :class:`OptimizerShards`. On a mesh, FSDP2 has already sharded the parameters over the scale
units (ZeRO levels, ``runtime/fsdp.py``), so the local shards are also the data-parallel shards; on fairseq's
DDP path, ZeRO-1 shards the optimizer states among the replicas with torch's ZeroRedundancyOptimizer.
"""

import logging

import torch.distributed as dist

from ..optim.in_backward import layer_step_groups
from .runtime.local_shards import LocalShards
from .runtime.mesh import PP
from .runtime.recompute import state_dict_name
from .runtime.zero import shard_optimizer_states
from .sharded_checkpoint import OptimizerShards, check_optimizer_by_parameter, read_optimizer_shards

logger = logging.getLogger(__name__)


def gather_over(group, obj):
    """``obj`` of every rank of ``group``, in group rank order (collective over ``group``)."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


class ShardedOptimizer:
    """The optimizer-building part of the cube trainer (mixed into it before fairseq's Trainer): reads the
    trainer's ``mesh``, ``plan``, ``pipeline``, ``checkpoint_format``, ``_model`` and ``_full_param_names``."""

    def _build_optimizer(self):
        """Adds to fairseq's optimizer: stepping local shards of a model on a mesh, and ZeRO-1 on DDP.

        On a mesh (tensor, pipeline or FSDP2 data parallel) the optimizer's parameters become each rank's
        local shards (plain tensors sharing storage with the DTensors), so fairseq's gradient scaling and
        its optimizers work unchanged; its state_dict is gathered to full tensors for checkpoints and cut
        back on load. ZeRO-1 on fairseq's DDP path (``--use-zero 1``): fairseq's own ``--zero-sharding os``
        needs fairscale, which is unmaintained; this uses torch's ZeroRedundancyOptimizer among the
        replicas, and fairseq's ``consolidate_optimizer`` before checkpoints already calls its
        ``consolidate_state_dict``. A plan with ``optimizer_in_backward`` hooks the step into the backward.
        """
        super()._build_optimizer()
        fairseq_optimizer = self._optimizer
        if self.mesh is not None:
            inner = fairseq_optimizer.optimizer
            self._shards = LocalShards(
                (p for group in inner.param_groups for p in group["params"]),
                pipeline_group=self.mesh.get_group(PP) if self.pipeline else None,
            )
            view_of = {id(p): v for p, v in zip(self._shards.params, self._shards.views)}
            for group in inner.param_groups:
                group["params"] = [view_of[id(p)] for p in group["params"]]
            self._gather_optimizer_state_in_checkpoints(fairseq_optimizer)
        if self.mesh is None and self.plan.zero and self.data_parallel_world_size > 1:
            fairseq_optimizer.optimizer = shard_optimizer_states(
                fairseq_optimizer.optimizer, fairseq_optimizer.optimizer_config, self.plan.zero_n_groups
            )
            logger.info(
                f"ZeRO-1: optimizer states sharded among {self.data_parallel_world_size} replicas "
                f"in {self.plan.zero_n_groups} group(s)"
            )
        if self.plan.optimizer_in_backward:  # refused with any other optimizer (model_spec.py)
            fairseq_optimizer.step_in_backward(layer_step_groups(self._model.named_parameters()))
            logger.info("the optimizer steps each weight inside the backward (optimizer_in_backward)")
        if self.checkpoint_format == "dcp":
            check_optimizer_by_parameter(fairseq_optimizer.optimizer, self._optimizer_params())

    def _optimizer_params(self):
        """(state_dict name, model parameter) of each tensor the optimizer steps on this rank, in its order."""
        return [(state_dict_name(n), p) for n, p in self._model.named_parameters() if p.requires_grad]

    def _gather_optimizer_state_in_checkpoints(self, fairseq_optimizer):
        """Replaces the fairseq optimizer's ``state_dict``/``load_state_dict`` (on this instance) by ones that
        give and take full tensors, as the model's do, so a tensor-parallel checkpoint loads in one process;
        ``load_state_dict`` also takes a sharded checkpoint's :class:`OptimizerShards` (this rank's states
        read from its folder, collective over all ranks)."""
        shards, state_dict, load_state_dict = (
            self._shards,
            fairseq_optimizer.state_dict,
            fairseq_optimizer.load_state_dict,
        )

        def views():
            return [p for group in fairseq_optimizer.optimizer.param_groups for p in group["params"]]

        pipeline_group = self.mesh.get_group(PP) if self.pipeline else None
        global_index = self._global_param_indices() if pipeline_group is not None else None

        def full_state_dict_():
            state = shards.full_optimizer_state(state_dict(), views())
            if pipeline_group is None:
                return state
            return merge_stage_optimizer_states(gather_over(pipeline_group, to_global_indices(state, global_index)))

        def load_local_state_dict(state, optimizer_overrides=None):
            if isinstance(state, OptimizerShards):
                local = read_optimizer_shards(state, fairseq_optimizer.optimizer, self._optimizer_params())
                return load_state_dict(local, optimizer_overrides)
            if pipeline_group is not None:
                state = to_local_indices(state, global_index)
            return load_state_dict(shards.local_optimizer_state(state, views()), optimizer_overrides)

        fairseq_optimizer.state_dict = full_state_dict_
        fairseq_optimizer.load_state_dict = load_local_state_dict

    def _global_param_indices(self):
        """For each parameter the optimizer steps on this rank, its index among the single-process
        model's trainable parameters (the optimizer state keys of a one-process checkpoint)."""
        index = {name: i for i, name in enumerate(self._full_param_names)}
        local = [state_dict_name(n) for n, p in self._model.named_parameters() if p.requires_grad]
        return [index[name] for name in local]

    def _reduce_grads(self) -> None:
        """After the last backward of an update: the optimizer's local views get their gradients (FSDP2 has
        averaged them over the scale units in the backward)."""
        self._shards.link_grads()


def to_global_indices(state: dict, global_index) -> dict:
    """An optimizer state_dict of one pipeline rank, keyed by the single-process parameter indices."""
    return {
        "state": {global_index[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [global_index[i] for i in group["params"]]} for group in state["param_groups"]
        ],
    }


def merge_stage_optimizer_states(parts) -> dict:
    """The single-process optimizer state_dict from every pipeline rank's (:func:`to_global_indices`)."""
    state = {index: value for part in parts for index, value in part["state"].items()}
    groups = [
        {**group, "params": sorted(i for part in parts for i in part["param_groups"][g]["params"])}
        for g, group in enumerate(parts[0]["param_groups"])
    ]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def to_local_indices(state: dict, global_index) -> dict:
    """The inverse of the gather: this rank's entries of a single-process optimizer state_dict."""
    local_of = {g: i for i, g in enumerate(global_index)}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [local_of[g] for g in group["params"] if g in local_of]})
    return {
        "state": {local_of[g]: value for g, value in state["state"].items() if g in local_of},
        "param_groups": groups,
    }
