"""Reading record files: JSON lines or one JSON list, with errors that name the file and line."""

import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

from ..errors import UserInputError


def read_json_records(path: str) -> List[Dict]:
    """Read ``path`` as a JSON list of objects or as JSON lines (one object per line).

    Raises:
        UserInputError: naming the file and line of the first malformed record, or saying the file is empty.
    """
    path = str(path)
    if not Path(path).is_file():
        raise UserInputError(f"{path}: no such file")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = raw.count(b"\n", 0, err.start) + 1
        raise UserInputError(
            f"{path}:{lineno}: bytes that are not UTF-8 ({raw[err.start : err.end]!r} at byte "
            f"{err.start}); save the file as UTF-8"
        ) from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}:{err.lineno}: malformed JSON list ({err.msg})") from None
        for index, record in enumerate(records):
            if not isinstance(record, dict):
                raise UserInputError(f"{path}: item {index} of the JSON list is not an object")
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}:{lineno}: malformed JSON line ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserInputError(f"{path}:{lineno}: a JSON line must be an object, got {type(record).__name__}")
        record["__line__"] = lineno
        records.append(record)
    return records


def _where(record: Dict, index: int) -> str:
    return f"line {record['__line__']}" if "__line__" in record else f"item {index}"


TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def require_fields(records: Sequence[Dict], fields: Union[Sequence[str], Dict[str, type]], path: str) -> None:
    """Raise a UserInputError naming file and line (or item) of the first record lacking one of ``fields``.

    ``fields`` is a list of names whose values must be strings, or a mapping from name to the type
    (or tuple of types) its value must have.
    """
    expected = fields if isinstance(fields, dict) else {name: str for name in fields}
    for index, record in enumerate(records):
        for name, types in expected.items():
            if name not in record:
                present = ", ".join(k for k in record if k != "__line__")
                raise UserInputError(
                    f"{path}: {_where(record, index)}: record is missing field {name!r} (has: {present})"
                )
            types = types if isinstance(types, tuple) else (types,)
            value = record[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                wanted = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in types)
                raise UserInputError(
                    f"{path}: {_where(record, index)}: field {name!r} must be {wanted}, got {type(value).__name__}"
                )


def split_path(data_dir: str, dataset_name: str, split: str) -> str:
    """Where the records of ``split`` live: ``{data_dir}/{dataset_name}_{split}.json``."""
    return os.path.join(data_dir, f"{dataset_name}_{split}.json")


def read_split(
    data_dir: str, dataset_name: str, split: str, fields: Union[Sequence[str], Dict[str, type]]
) -> List[Dict]:
    """Read and validate the records of one split as a list; an empty split is a UserInputError.
    ``{name}_{split}.json`` is read here (errors by line); the other formats of ``sources.py`` through datasets."""
    from .sources import find_split_source, load_source

    path = split_path(data_dir, dataset_name, split)
    source = None if os.path.isfile(path) else find_split_source(data_dir, dataset_name, split)
    if source is not None:
        path = source.describe()
        records = [{k: v for k, v in r.items() if v is not None} for r in load_source(source)]
    else:
        records = read_json_records(path)
    if not records:
        raise UserInputError(f"{path}: the split is empty; it needs at least one record")
    require_fields(records, fields, path)
    return records


SPLITS = ("train", "valid", "test")


def read_present_splits(data_dir: str, dataset_name: str, fields) -> Dict[str, List[Dict]]:
    """Records of train (required) and of valid and test where their files exist, keyed by split."""
    from .sources import find_split_source

    return {
        split: read_split(data_dir, dataset_name, split, fields)
        for split in SPLITS
        if split == "train" or find_split_source(data_dir, dataset_name, split) is not None
    }
