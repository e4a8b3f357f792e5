"""What fairseq's Trainer holds in place of its DDP wrapper when the model runs on a mesh."""

import torch

from .runtime.local_shards import full_state_dict, localize_state_dict
from .sharded_checkpoint import ModelShards, load_model_shards
from .sharded_optimizer import gather_over


class TensorParallelModel(torch.nn.Module):
    """What fairseq's Trainer holds in place of its DDP wrapper when the model runs on a mesh (tensor,
    pipeline or FSDP2 data parallel).

    Calls and missing attributes go to the model. fairseq calls ``all_reduce_grads`` after the last
    backward of an update (``reduce_grads``: the trainer averages them over the dp axis);
    ``state_dict`` gathers DTensors into full tensors (collective over tp), so a checkpoint loads in one
    process; ``load_state_dict`` takes such full tensors and keeps each rank's shard, or a sharded
    checkpoint's :class:`ModelShards` and reads this rank's shards (collective over all ranks).


    ``no_sync`` (``fsdp.accumulation_without_sync``): what fairseq enters for the batches of an update
    before its last, as it does for DDP's ``no_sync``.

    With pipeline parallel (``pipeline_group``) the module holds only this rank's stages: ``state_dict``
    also gathers the other stages' tensors (collective over the pp group) and ``load_state_dict`` keeps
    the entries of this rank's stages.
    """

    def __init__(self, module: torch.nn.Module, reduce_grads, pipeline_group=None, full_keys=(), no_sync=None):
        super().__init__()
        self.module = module
        self._reduce_grads = reduce_grads
        self._pipeline_group = pipeline_group
        self._full_keys = list(full_keys)  # the single-process state_dict order
        if no_sync is not None:  # fairseq runs the batches of an update before its last under it
            self.no_sync = no_sync

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def all_reduce_grads(self) -> None:
        self._reduce_grads()

    def state_dict(self, *args, **kwargs):
        state = full_state_dict(self.module.state_dict(*args, **kwargs))
        if self._pipeline_group is None:
            return state
        parts = gather_over(
            self._pipeline_group,
            {key: value.cpu() if torch.is_tensor(value) else value for key, value in state.items()},
        )
        merged = {key: value for part in parts for key, value in part.items()}
        order = {key: i for i, key in enumerate(self._full_keys)}
        return dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order))))

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if isinstance(state_dict, ModelShards):
            return load_model_shards(self.module, state_dict)
        if self._pipeline_group is not None:
            mine = self.module.state_dict(keep_vars=True)
            state_dict = {key: value for key, value in state_dict.items() if key in mine}
        return self.module.load_state_dict(
            localize_state_dict(self.module, state_dict), strict=strict, model_cfg=model_cfg, args=args
        )
