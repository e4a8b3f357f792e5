"""Reading checkpoint files without running code from them: tensors and an explicit list of types only.

A pickle can name any function and have it called while it is read, so a file planted in a checkpoint
folder (a shared file system, a folder copied from elsewhere) would run its payload in every process that
opens it. Every checkpoint file the project reads goes through here:

- fairseq's ``.pt`` files: ``torch.load(weights_only=True)`` with :data:`CHECKPOINT_GLOBALS` allowed;
  the project's checkpoints hold only dicts, lists, numbers, strings and tensors (fairseq saves its
  config as plain containers), and fairseq's older checkpoints an ``argparse.Namespace`` under ``args``;
- torch.distributed.checkpoint folders: their ``.metadata`` (a plain pickle in torch) is read with
  :class:`_MetadataUnpickler`, which allows the checkpoint's own metadata classes and nothing else, and
  their small objects (a step count) with ``weights_only=True`` (:class:`SafeLoadPlanner`).

A file that needs anything else is refused with one :class:`UserInputError` naming the file and the type.
"""

import argparse
import contextlib
import io
import os
import pickle
import re
from typing import Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import UserInputError

CHECKPOINT_GLOBALS = [argparse.Namespace]  # beyond torch's own weights_only set: fairseq's legacy "args"
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


def refusal(path, err: Exception) -> UserInputError:
    """The one-line error for a file whose pickle asks for more than tensors and the allowed types."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    wanted = f"it asks for {found.group(1)}" if found else f"it is not a checkpoint ({str(err).splitlines()[0][:120]})"
    return UserInputError(
        f"{path}: refused to read: {wanted}, which no checkpoint of fairseq_ext holds (only "
        f"tensors and plain values); this file was not written by a run of this project: remove "
        f"it, or copy the checkpoint again from its source"
    )


@contextlib.contextmanager
def checkpoint_types_only(path) -> Iterator[None]:
    """Within: ``torch.load`` (weights_only, torch's default) also accepts :data:`CHECKPOINT_GLOBALS`; a file
    that needs more raises :class:`UserInputError` naming ``path``."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0") not in ("", "0"):
        raise UserInputError(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, but checkpoints are read with weights_only; unset it"
        )
    with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
        try:
            yield
        except pickle.UnpicklingError as err:
            raise refusal(path, err) from err


def load_checkpoint_file(path, mmap: bool = False):
    """``torch.load`` of a checkpoint file onto the CPU, weights_only with :data:`CHECKPOINT_GLOBALS`."""
    with checkpoint_types_only(path):
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint ``.metadata`` file: its metadata classes, torch sizes, dtypes
    and layouts; any other global (a function to call, a class of another module) is refused."""

    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):  # dataclasses and enums, never a function to call
                return found
        elif (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader, reading ``.metadata`` with :class:`_MetadataUnpickler` instead of pickle."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = os.path.join(self.path, ".metadata")
        with open(path, "rb") as file:
            try:
                metadata = _MetadataUnpickler(file).load()
            except pickle.UnpicklingError as err:
                raise refusal(path, err) from err
        if not isinstance(metadata, Metadata):
            raise UserInputError(f"{path} is not the metadata of a torch.distributed.checkpoint folder")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """torch's DefaultLoadPlanner, reading a folder's small objects only once ``weights_only=True`` has
    read them (so torch's own read of them finds nothing but allowed types)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        with checkpoint_types_only(f"the shards folder's object {read_item.dest_index.fqn}"):
            torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)
