"""Sharded checkpoints: torch.distributed.checkpoint (DCP) folders under fairseq's checkpoint names.

fairseq writes a checkpoint as one file from the first rank, which must first hold the whole model and
optimizer. A sharded checkpoint keeps fairseq's files and names, small, and puts the tensors beside them:

    checkpoint_last.pt       fairseq's file: cfg, extra_state (epoch, updates, iterator position, metrics),
    checkpoint_1_40.pt       optimizer_history (LR scheduler state), task state; under "dcp" the name of its
    ...                      shards folder, the optimizer's hyperparameters and the single-process
                             parameter order. No tensors of the model or optimizer.
    shards-u40-3fa2c1.dcp/   the DCP folder: .metadata and one __<rank>_0.distcp per rank, holding
                               model.<state_dict key>               the model's weights
                               optimizer.<parameter>.<state name>   e.g. exp_avg, exp_avg_sq, step
                             Sharded weights are DTensors and optimizer states are placed like their
                             parameter, so each rank writes only its own shards (a tensor replicated on
                             several ranks is written once) and ``dcp.load`` reshards them for any plan.

The small file is the commit point: shards go to a temporary folder renamed into place once every rank
has written, then the file is written under a temporary name and renamed. A run killed at any moment
leaves the previous checkpoint whole. Each save makes a new folder, so fairseq's other names for the
same checkpoint (copies of the small file) share it; fairseq's ``--keep-*`` cleanup deletes files only,
so after each save :func:`remove_unreferenced_shards` deletes the folders no file names any more.
"""

import contextlib
import logging
import os
import re
import secrets
import shutil
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fairseq import checkpoint_utils
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from ..errors import UserInputError
from ..safe_load import SafeFileSystemReader, SafeLoadPlanner, checkpoint_types_only, load_checkpoint_file
from .checkpoint_faults import READ_ERRORS, unreadable_checkpoint
from .runtime.local_shards import local_tensor
from .runtime.mesh import TP
from .runtime.zero import is_zero_redundancy

SHARDS_KEY = "dcp"  # the small file's entry that names its shards folder
FORMAT_VERSION = 1
MODEL, OPTIMIZER = "model.", "optimizer."  # key prefixes inside the DCP folder
SHARDS_FOLDER = re.compile(r"shards-u\d+-[0-9a-f]+\.dcp")
TEMPORARY_FOLDER = re.compile(r"\.shards-u\d+-[0-9a-f]+\.dcp\.tmp")

logger = logging.getLogger(__name__)
_fairseq_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu
_left_on_disk = False


@dataclass
class ModelShards:
    """In place of a checkpoint's model state_dict: the DCP folder its weights are read from."""

    folder: str


@dataclass
class OptimizerShards:
    """In place of a checkpoint's optimizer state_dict: the DCP folder of the states, and what the small
    file keeps (hyperparameters of each group, single-process parameter order, other entries)."""

    folder: str
    param_groups: List[dict]
    param_names: List[str]
    extra: Dict[str, object] = field(default_factory=dict)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _quiet_in_one_process():
    """dcp warns at every single-process save or load (no_dist=True) that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dcp_save(state: dict, folder: str) -> None:
    with _quiet_in_one_process():
        dcp.save(state, checkpoint_id=folder, no_dist=not _distributed())


def _dcp_load(state: dict, folder: str, no_dist: bool = False) -> None:
    """Read ``folder`` into ``state``'s tensors in place (collective unless ``no_dist`` or single-process)."""
    with _quiet_in_one_process():
        dcp.load(
            state,
            checkpoint_id=folder,
            storage_reader=SafeFileSystemReader(folder),
            planner=SafeLoadPlanner(),
            no_dist=no_dist or not _distributed(),
        )


# ---- saving ----


def has_strided_shards(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a DTensor split over tensor parallel in interleaved pieces (``_StridedShard``:
    GPT-2's fused q/k/v, each rank its heads of q, k and v), which torch.distributed.checkpoint cannot
    describe as chunks. FSDP2's strided shards over the data-parallel axes of a tensor-parallel shard are
    chunks of it, which it saves and reshards."""
    from torch.distributed.tensor.placement_types import _StridedShard

    def strided_over_tp(value) -> bool:
        names = value.device_mesh.mesh_dim_names or ()
        return any(
            isinstance(p, _StridedShard) and (dim >= len(names) or names[dim] == TP)
            for dim, p in enumerate(value.placements)
        )

    return any(isinstance(value, DTensor) and strided_over_tp(value) for value in module.state_dict().values())


def model_entries(module: torch.nn.Module) -> Dict[str, object]:
    """This rank's model weights for the DCP folder: its state_dict (DTensors stay shards), keys prefixed."""
    return {MODEL + key: value for key, value in module.state_dict().items()}


def _optimizer_views(torch_optimizer) -> List[torch.Tensor]:
    return [p for group in torch_optimizer.param_groups for p in group["params"]]


def _held_states(torch_optimizer):
    """The per-parameter states this rank keeps (ZeRO-1: those of its share of the parameters)."""
    if is_zero_redundancy(torch_optimizer):
        return torch_optimizer.optim.state
    return torch_optimizer.state


def check_optimizer_by_parameter(torch_optimizer, params: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Raise UserInputError unless ``torch_optimizer`` steps one tensor per parameter of ``params`` (the
    model's trainable parameters, in order, or their local shards): its states are saved by name."""
    views = _optimizer_views(torch_optimizer)
    shapes = [tuple(local_tensor(p).shape) for _, p in params]
    if len(views) != len(params) or [tuple(v.shape) for v in views] != shapes:
        raise UserInputError(
            f"--checkpoint-format dcp saves optimizer states by parameter name, but the optimizer "
            f"steps {len(views)} tensors for the model's {len(params)} trainable parameters "
            f"(fairseq's --fp16 flattens them); add --fp16-no-flatten-grads or use "
            f"--checkpoint-format full"
        )
    if len(torch_optimizer.param_groups) != 1:
        raise UserInputError(
            f"--checkpoint-format dcp saves optimizers with one parameter group, got "
            f"{len(torch_optimizer.param_groups)}; use --checkpoint-format full"
        )


def placed_like(param: torch.Tensor, value):
    """An optimizer state of ``param``'s local shard as a DTensor placed like ``param`` (no communication);
    states of another shape (a step count) and states of plain parameters stay as they are."""
    if (
        isinstance(param, DTensor)
        and torch.is_tensor(value)
        and value.dim() > 0
        and value.shape == local_tensor(param).shape
    ):
        return DTensor.from_local(
            value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return value


def optimizer_entries(torch_optimizer, params: Sequence[Tuple[str, torch.Tensor]]) -> Dict[str, object]:
    """This rank's optimizer states for the DCP folder, keyed ``optimizer.<parameter name>.<state name>``.

    Args:
        torch_optimizer: the optimizer stepping the parameters (or their local shards), maybe ZeRO-1's.
        params: (state_dict name, model parameter) of each tensor it steps, in its param_groups' order.
    """
    states = _held_states(torch_optimizer)
    entries = {}
    for (name, param), view in zip(params, _optimizer_views(torch_optimizer)):
        for key, value in states.get(view, {}).items():
            entries[f"{OPTIMIZER}{name}.{key}"] = placed_like(param, value)
    return entries


def optimizer_record(fairseq_optimizer, param_names: Sequence[str]) -> dict:
    """What the small file keeps of the optimizer: hyperparameters of its groups, the single-process
    parameter order (a one-process load numbers states by it) and fairseq's other entries."""
    groups = [{k: v for k, v in group.items() if k != "params"} for group in fairseq_optimizer.optimizer.param_groups]
    scaler = getattr(fairseq_optimizer, "scaler", None)  # fairseq's --fp16 loss scaler
    extra = {"loss_scale": scaler.loss_scale} if scaler is not None else {}
    return {"param_groups": groups, "param_names": list(param_names), "extra": extra}


def check_shared_save_dir(save_dir: str) -> None:
    """Raise UserInputError on every rank unless all ranks see the same ``save_dir`` (one filesystem): each
    writes its own file of a shards folder, and the first rank renames the folder (collective)."""
    if not _distributed() or dist.get_world_size() == 1:
        return
    token = [secrets.token_hex(8) if _rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(save_dir, f".shared-{token[0]}")
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        open(probe, "w").close()
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.exists(probe))
    if _rank() == 0:
        os.remove(probe)
    missing = [rank for rank, ok in enumerate(seen) if not ok]
    if missing:
        raise UserInputError(
            f"--checkpoint-format dcp: every rank writes its shards into --save-dir {save_dir}, "
            f"but ranks {missing} do not see the first rank's files there; put CHECKPOINT_DIR on "
            f"a filesystem all nodes share, or use CHECKPOINT_FORMAT=full"
        )


def new_folder_name(num_updates: int) -> str:
    return f"shards-u{num_updates}-{secrets.token_hex(3)}.dcp"


def write_shards(save_dir: str, state: Dict[str, object], num_updates: int) -> str:
    """Write ``state`` (this rank's tensors, DTensors and small objects) as a new DCP folder in ``save_dir``.

    Collective over all ranks when torch.distributed is initialized: each rank writes its own file. The
    folder appears whole or not at all: it is written under a temporary name and renamed by the first
    rank once every rank's file and the metadata are written.

    Returns:
        the folder's name (the same on every rank).
    """
    name = None
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        _remove_temporaries(save_dir)
        name = new_folder_name(num_updates)
    if _distributed():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    tmp = os.path.join(save_dir, f".{name}.tmp")
    _dcp_save(state, tmp)
    # dcp.save returns once the first rank has written the metadata, after every rank's file
    if _rank() == 0:
        os.rename(tmp, os.path.join(save_dir, name))
    return name


def shards_record(folder_name: str, optimizer: Optional[dict]) -> dict:
    """The small file's ``dcp`` entry: its shards folder (relative to the file) and optimizer record."""
    return {"version": FORMAT_VERSION, "folder": folder_name, "optimizer": optimizer}


def _remove_temporaries(save_dir: str) -> None:
    """Remove the temporary folders of saves that were interrupted (never referenced by any file)."""
    for name in os.listdir(save_dir):
        if TEMPORARY_FOLDER.fullmatch(name):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def referenced_folder(path: str) -> Optional[str]:
    """The shards folder named by the checkpoint file ``path``, or None for a full checkpoint.

    Reads only the file's small objects (tensors of a full checkpoint are memory-mapped, not read), and
    refuses a file holding more than tensors and a checkpoint's plain values."""
    state = load_checkpoint_file(path, mmap=True)
    record = state.get(SHARDS_KEY) if isinstance(state, dict) else None
    return record["folder"] if record else None


def remove_unreferenced_shards(save_dir: str) -> List[str]:
    """Delete the shards folders in ``save_dir`` that no ``*.pt`` file there names (fairseq's cleanup
    deleted their files). Keeps everything when a ``.pt`` file cannot be read. Returns the deleted names."""
    if not os.path.isdir(save_dir):
        return []
    names = os.listdir(save_dir)
    folders = [n for n in names if SHARDS_FOLDER.fullmatch(n) and os.path.isdir(os.path.join(save_dir, n))]
    if not folders:
        return []
    referenced = set()
    for name in names:
        path = os.path.join(save_dir, name)
        if name.endswith(".pt") and os.path.isfile(path):
            try:
                referenced.add(referenced_folder(path))
            except Exception as err:  # a file being replaced, or not a checkpoint: it may name any folder
                logger.warning(f"keeping every shards folder: cannot read {path} ({err})")
                return []
    removed = [n for n in folders if n not in referenced]
    for name in removed:
        shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    return removed


# ---- loading ----


@contextlib.contextmanager
def shards_left_on_disk():
    """Within: :func:`read_checkpoint` gives :class:`ModelShards` and :class:`OptimizerShards` for a sharded
    checkpoint instead of reading its tensors, so that each rank then loads only its own shards."""
    global _left_on_disk
    previous, _left_on_disk = _left_on_disk, True
    try:
        yield
    finally:
        _left_on_disk = previous


def read_checkpoint(
    path: str, arg_overrides: Optional[dict] = None, load_on_all_ranks: bool = False, optimizer: bool = True
) -> dict:
    """fairseq's ``load_checkpoint_to_cpu`` for full and sharded checkpoints alike.

    For a sharded checkpoint the model and optimizer states are read from its DCP folder into full
    tensors in this process (no process group needed), so the result is what a full checkpoint holds:
    ``model`` (state_dict) and ``last_optimizer_state`` (numbered like the single-process optimizer's).
    Under :func:`shards_left_on_disk` they are :class:`ModelShards` / :class:`OptimizerShards` instead.

    Args:
        optimizer: read the optimizer states too (an export needs the weights only).
    """
    with checkpoint_types_only(path):
        try:
            state = _fairseq_load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)
        except READ_ERRORS as err:
            if not os.path.isfile(path):
                raise
            raise unreadable_checkpoint(path, err) from err
    record = state.pop(SHARDS_KEY, None)
    if record is None:
        return state
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), record["folder"])
    if not os.path.isdir(folder):
        raise UserInputError(
            f"{path} keeps its weights in the folder {record['folder']} beside it, which does not "
            f"exist; copy or move the checkpoint file together with that folder"
        )
    optimizer_record_ = record.get("optimizer")
    if _left_on_disk:
        state["model"] = ModelShards(folder)
        if optimizer_record_ is not None:
            state["last_optimizer_state"] = OptimizerShards(folder, **optimizer_record_)
        return state
    model, states = read_full_state(folder, optimizer=optimizer and optimizer_record_ is not None)
    state["model"] = model
    if states is not None:
        state["last_optimizer_state"] = numbered_optimizer_state(optimizer_record_, states)
    return state


def _metadata(folder: str) -> dict:
    return SafeFileSystemReader(folder).read_metadata().state_dict_metadata


def read_full_state(folder: str, optimizer: bool = True) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """Read a DCP folder into full tensors in this process (whatever plan wrote it).

    Returns:
        (model state_dict, {parameter name: {state name: value}} or None without ``optimizer``).
    """
    prefixes = (MODEL, OPTIMIZER) if optimizer else (MODEL,)
    targets = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype) if isinstance(meta, TensorStorageMetadata) else None
        for key, meta in _metadata(folder).items()
        if key.startswith(prefixes)
    }
    _dcp_load(targets, folder, no_dist=True)
    model = {key[len(MODEL) :]: value for key, value in targets.items() if key.startswith(MODEL)}
    if not optimizer:
        return model, None
    states = defaultdict(dict)
    for key, value in targets.items():
        if key.startswith(OPTIMIZER):
            name, state_name = key[len(OPTIMIZER) :].rsplit(".", 1)
            states[name][state_name] = value
    return model, dict(states)


def numbered_optimizer_state(record: dict, states: Dict[str, dict]) -> dict:
    """The single-process optimizer state_dict (states numbered by parameter order) of a sharded checkpoint."""
    names = record["param_names"]
    return {
        "state": {i: states[name] for i, name in enumerate(names) if name in states},
        "param_groups": [{**record["param_groups"][0], "params": list(range(len(names)))}],
        **record.get("extra", {}),
    }


def load_model_shards(module: torch.nn.Module, shards: ModelShards) -> None:
    """Load the weights of ``module`` (this rank's: DTensor shards, pipeline stages) in place from the DCP
    folder. Collective over all ranks when torch.distributed is initialized; raises when a key is missing."""
    targets = model_entries(module)  # tensors sharing storage with the parameters
    _dcp_load(targets, shards.folder)


def _empty_like(param: torch.Tensor, meta):
    """A tensor to read a saved optimizer state into: placed like ``param`` when it has the parameter's shape."""
    if not isinstance(meta, TensorStorageMetadata):
        return None  # a Python object (fairseq's adam counts steps as an int)
    if isinstance(param, DTensor) and tuple(meta.size) == tuple(param.shape) and len(meta.size) > 0:
        local = local_tensor(param)
        return DTensor.from_local(
            torch.empty(local.shape, dtype=meta.properties.dtype, device=local.device),
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
    return torch.empty(meta.size, dtype=meta.properties.dtype)


def read_optimizer_shards(shards: OptimizerShards, torch_optimizer, params: Sequence[Tuple[str, torch.Tensor]]) -> dict:
    """This rank's optimizer states from the DCP folder, as the state_dict ``torch_optimizer.load_state_dict``
    takes (states numbered by its param_groups, local shards; ZeRO-1: only this rank's share).

    Collective over all ranks when torch.distributed is initialized.

    Args:
        params: (state_dict name, model parameter) of each tensor the optimizer steps, in order.
    """
    by_parameter = defaultdict(dict)
    for key, meta in _metadata(shards.folder).items():
        if key.startswith(OPTIMIZER):
            name, state_name = key[len(OPTIMIZER) :].rsplit(".", 1)
            by_parameter[name][state_name] = (key, meta)
    views = _optimizer_views(torch_optimizer)
    held = (
        {id(p) for p in _optimizer_views(torch_optimizer.optim)}
        if is_zero_redundancy(torch_optimizer)
        else {id(v) for v in views}
    )
    targets = {}
    for (name, param), view in zip(params, views):
        if id(view) in held:
            for key, meta in by_parameter.get(name, {}).values():
                targets[key] = _empty_like(param, meta)
    _dcp_load(targets, shards.folder)
    state = {}
    for index, ((name, _), view) in enumerate(zip(params, views)):
        if id(view) in held and name in by_parameter:
            state[index] = {
                state_name: local_tensor(targets[key]) if torch.is_tensor(targets[key]) else targets[key]
                for state_name, (key, _) in by_parameter[name].items()
            }
    if len(shards.param_groups) != len(torch_optimizer.param_groups):
        raise UserInputError(
            f"the checkpoint's optimizer has {len(shards.param_groups)} parameter groups, this one "
            f"{len(torch_optimizer.param_groups)}; use --reset-optimizer"
        )
    groups, start = [], 0
    for saved, group in zip(shards.param_groups, torch_optimizer.param_groups):
        groups.append({**saved, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": state, "param_groups": groups, **shards.extra}
