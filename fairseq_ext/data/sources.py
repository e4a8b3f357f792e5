"""Where the records of a split live and how they are read: JSON, JSON lines, parquet or a ``save_to_disk`` folder.

For ``DATA`` and ``DATASET_NAME``, the records of ``split`` are the first of:

- ``{data}/{name}_{split}.json`` (JSON lines or one JSON list), ``.jsonl`` or ``.parquet`` (exactly one of them);
- ``{data}/{name}_{split}/``, a folder written by ``datasets.Dataset.save_to_disk``;
- ``{data}`` itself, a ``DatasetDict`` folder written by ``save_to_disk`` that holds ``split`` (``valid`` may
  be called ``validation``).

Records are read into a ``datasets.Dataset`` backed by Arrow files on disk (memory-mapped, never Python
lists); a file that does not parse, or a record without a required field, is a UserInputError naming
the file and the line or record.
"""

import atexit
import codecs
import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserInputError
from .records import read_json_records, require_fields

FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
SPLIT_ALIASES = {"valid": ("valid", "validation"), "train": ("train",), "test": ("test",)}
STRING_TYPES = (pa.string(), pa.large_string())


@dataclass(frozen=True)
class SplitSource:
    """The records of one split: a file (``json``/``parquet``), a ``save_to_disk`` Dataset folder (``disk``),
    or split ``member`` of a ``save_to_disk`` DatasetDict folder (``disk_dict``)."""

    path: str
    kind: str
    member: str = ""

    def describe(self) -> str:
        return f"{self.path} (split {self.member})" if self.kind == "disk_dict" else self.path

    def files(self) -> List[str]:
        """Every file the records are read from (what a change of the data changes)."""
        if os.path.isfile(self.path):
            return [self.path]
        return sorted(os.path.join(root, name) for root, _, names in os.walk(self.path) for name in names)


def _is_disk_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    )


def find_split_source(data_dir: str, dataset_name: str, split: str) -> Optional[SplitSource]:
    """The source of ``split`` (see the module docstring), or None when there is none."""
    stem = os.path.join(data_dir, f"{dataset_name}_{split}")
    files = [stem + suffix for suffix in FILE_SUFFIXES if os.path.isfile(stem + suffix)]
    if len(files) > 1:
        raise UserInputError(f"split {split} has several record files: {', '.join(files)}; keep one of them")
    if files:
        return SplitSource(files[0], "parquet" if files[0].endswith(".parquet") else "json")
    if os.path.isdir(stem) and _is_disk_folder(stem):
        return SplitSource(stem, "disk")
    if os.path.isfile(os.path.join(data_dir, "dataset_dict.json")):
        with open(os.path.join(data_dir, "dataset_dict.json"), encoding="utf-8") as f:
            members = json.load(f).get("splits", [])
        for member in SPLIT_ALIASES.get(split, (split,)):
            if member in members:
                return SplitSource(data_dir, "disk_dict", member)
    return None


def require_split_source(data_dir: str, dataset_name: str, split: str) -> SplitSource:
    """The source of ``split``; none is a UserInputError saying what was looked for."""
    source = find_split_source(data_dir, dataset_name, split)
    if source is None:
        stem = os.path.join(data_dir, f"{dataset_name}_{split}")
        raise UserInputError(
            f"{stem}.json: no such file (looked for {stem}.json, .jsonl, .parquet, a save_to_disk "
            f"folder {stem}/ and a save_to_disk DatasetDict in {data_dir} with split {split})"
        )
    return source


_scratch: List[str] = []


def scratch_dir() -> str:
    """A folder for Arrow files made while reading (removed at exit unless a cache claims them)."""
    if not _scratch:
        _scratch.append(tempfile.mkdtemp(prefix="fairseq_ext_records_"))
        atexit.register(shutil.rmtree, _scratch[0], True)
    return _scratch[0]


@contextlib.contextmanager
def progress_on_stdout():
    """datasets' progress bars on stdout: run.sh keeps the workers' stderr in a file and shows it only on failure."""
    with contextlib.redirect_stderr(sys.stdout):
        yield


PARQUET_BATCH_ROWS = 10_000


def _parquet_to_arrow(path: str, cache_dir: str) -> datasets.Dataset:
    """A parquet file as a memory-mapped Arrow file, read page by page in batches of rows: datasets' parquet
    reader holds a whole row group in memory (pyarrow writes up to a million rows in one)."""
    import hashlib

    import pyarrow.parquet as pq

    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    target = os.path.join(cache_dir, f"parquet-{hashlib.sha256(key).hexdigest()[:24]}.arrow")
    if not os.path.isfile(target):
        os.makedirs(cache_dir, exist_ok=True)
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        partial = target + ".partial"
        with pa.OSFile(partial, "wb") as sink, pa.ipc.new_stream(sink, parquet.schema_arrow) as writer:
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                writer.write_batch(batch)
        os.replace(partial, target)
    return datasets.Dataset.from_file(target)


def _load_file(source: SplitSource, cache_dir: str) -> datasets.Dataset:
    if source.kind == "parquet":
        return _parquet_to_arrow(source.path, cache_dir)
    with progress_on_stdout():
        return datasets.load_dataset("json", data_files=source.path, split="train", cache_dir=cache_dir)


def _is_utf8(path: str) -> bool:
    """Whether the whole file decodes as UTF-8, read in 16 MiB pieces: Arrow's JSON reader takes other bytes
    into its strings and the error surfaces later, far from the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for piece in iter(lambda: f.read(1 << 24), b""):
                decoder.decode(piece)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def load_source(source: SplitSource, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """The records of ``source`` as a memory-mapped Dataset; a file that does not parse is a UserInputError
    naming the file and line."""
    if source.kind in ("disk", "disk_dict"):
        try:
            loaded = datasets.load_from_disk(source.path, keep_in_memory=False)
        except (FileNotFoundError, ValueError) as err:
            raise UserInputError(f"{source.path} is not a folder written by datasets' save_to_disk ({err})") from None
        return loaded[source.member] if source.kind == "disk_dict" else loaded
    if source.kind == "json" and not _is_utf8(source.path):
        read_json_records(source.path)  # raises naming the line of the first bytes that are not UTF-8
    try:
        return _load_file(source, cache_dir or scratch_dir())
    except Exception as err:  # noqa: BLE001 -- any failure of the fast reader is explained by the exact one below
        if source.kind == "json" and not read_json_records(source.path):  # raises naming the first bad line
            raise UserInputError(f"{source.path}: the split is empty; it needs at least one record") from None
        cause = err.__cause__ or err
        raise UserInputError(
            f"{source.path}: cannot be read as {source.kind} records "
            f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"
        ) from None


def _first_null(column: pa.ChunkedArray) -> int:
    return int(pc.index(pc.is_null(column), True).as_py())


def check_fields(records: datasets.Dataset, source: SplitSource, fields: Dict[str, type]) -> None:
    """Every record holds every field of ``fields`` with a value of its type (strings checked by Arrow type);
    a record that does not is a UserInputError naming the file and the line (JSON) or record."""
    if len(records) == 0:
        raise UserInputError(f"{source.describe()}: the split is empty; it needs at least one record")
    problem: Optional[Tuple[int, str]] = None
    table = records.with_format("arrow")[:]
    for name, types in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        if name not in table.column_names:
            problem = (0, f"record is missing field {name!r} (has: {', '.join(table.column_names)})")
            break
        column = table.column(name)
        if column.null_count:
            problem = (_first_null(column), f"record is missing field {name!r}")
            break
        if types == (str,) and column.type not in STRING_TYPES:
            problem = (0, f"field {name!r} must be a string, got {column.type}")
            break
    if problem is None:
        return
    if source.kind == "json":  # the exact reader names the line
        require_fields(read_json_records(source.path), fields, source.path)
    index, message = problem
    raise UserInputError(f"{source.describe()}: record {index + 1}: {message}")


def load_split_records(
    data_dir: str, dataset_name: str, split: str, fields: Dict[str, type], optional: Dict[str, type] = None
) -> Tuple[datasets.Dataset, SplitSource]:
    """The checked records of ``split`` and where they came from. ``optional`` fields may be absent or null;
    where present their Arrow type is checked like the required ones."""
    source = require_split_source(data_dir, dataset_name, split)
    records = load_source(source)
    check_fields(records, source, fields)
    for name, types in (optional or {}).items():
        if (
            name in records.column_names
            and types is str
            and records.features[name].dtype not in ("string", "large_string", "null")
        ):
            if source.kind == "json":
                require_fields([r for r in read_json_records(source.path) if name in r], [name], source.path)
            raise UserInputError(f"{source.describe()}: field {name!r} must be a string, got {records.features[name]}")
    return records, source
