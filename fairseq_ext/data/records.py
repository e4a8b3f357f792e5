"""Reading record files: JSON lines or one JSON list, with errors that name the file and line."""

import json
from pathlib import Path
from typing import Dict, List, Sequence

from ..errors import UserInputError


def read_json_records(path: str) -> List[Dict]:
    """Read ``path`` as a JSON list of objects or as JSON lines (one object per line).

    Raises:
        UserInputError: naming the file and line of the first malformed record, or saying the file is empty.
    """
    path = str(path)
    if not Path(path).is_file():
        raise UserInputError(f"{path}: no such file")
    text = Path(path).read_text(encoding="utf-8")
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


def require_fields(records: Sequence[Dict], fields: Sequence[str], path: str) -> None:
    """Raise a UserInputError naming file and line (or item) of the first record lacking a string in one of ``fields``."""
    for index, record in enumerate(records):
        for name in fields:
            if name not in record:
                present = ", ".join(k for k in record if k != "__line__")
                raise UserInputError(f"{path}: {_where(record, index)}: record is missing field {name!r} (has: {present})")
            if not isinstance(record[name], str):
                kind = type(record[name]).__name__
                raise UserInputError(f"{path}: {_where(record, index)}: field {name!r} must be a string, got {kind}")
