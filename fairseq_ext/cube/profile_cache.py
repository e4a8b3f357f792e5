"""Model profiles kept on disk, so that a later compile of the same model and settings skips profiling.

A profile is stored as JSON (nothing executable is loaded from disk) in ``$FAIRSEQ_EXT_PROFILE_CACHE``, or
``~/.cache/fairseq_ext/profiles`` when unset (``off``: no cache), in a file named by a hash of all that
changes it: ``profile_model``'s arguments, the classes given to ``custom.register_module``, the torch and
transformers versions, and the source of every ``.py`` file of the ``fairseq_ext`` package. The whole
package, not only ``cube/``: profiling reaches beyond it (``model_spec`` imports ``optim.low_bit``, LoRA reads
``models.lora``), hashing it takes a few milliseconds, and a stale profile would mislead the search silently
where a needless miss costs one profiling.

Several processes may store a profile at once (torchrun's ranks, pytest's workers): each writes a temporary
file beside the final one and renames it into place, so no half-written file is ever read. A missing or
malformed file is a miss, and a folder that cannot be written leaves the profile unstored: the cache never
fails a run.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from typing import Any, Optional, Tuple, Union, get_args, get_origin, get_type_hints

from .custom import CUSTOM_MODULES
from .profile_types import ModelProfile

CACHE_ENV = "FAIRSEQ_EXT_PROFILE_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "fairseq_ext", "profiles")
OFF = "off"
FORMAT = 1  # the file layout's version, raised when the codec changes
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fairseq_ext


def cache_dir() -> Optional[str]:
    """The folder profiles are kept in, or None when the cache is off."""
    root = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return None if root.strip().lower() == OFF else os.path.abspath(os.path.expanduser(root))


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 of every ``.py`` file of the ``fairseq_ext`` package (path relative to it, and content)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(_PACKAGE)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def profile_key(config_json: str, seq_len, precision, tp_degrees, attn_implementation, compiled, lora) -> Optional[str]:
    """sha256 naming the profile of these ``profile_model`` arguments under this code and these libraries; None
    for a model type transformers does not ship (its code, registered at run time, is not hashed: not cached)."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if json.loads(config_json).get("model_type") not in CONFIG_MAPPING_NAMES:
        return None
    data = dict(
        format=FORMAT,
        config=config_json,
        seq_len=seq_len,
        precision=precision,
        tp_degrees=list(tp_degrees),
        attn_implementation=attn_implementation,
        compiled=bool(compiled),
        lora=None if lora is None else dataclasses.asdict(lora),
        custom_modules=CUSTOM_MODULES,
        torch=torch.__version__,
        transformers=transformers.__version__,
        source=source_hash(),
    )
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


def load(key: Optional[str]) -> Optional[ModelProfile]:
    """The stored profile of ``key``; None when the cache is off or holds no readable one."""
    path = _path(key)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data["format"] != FORMAT or data["key"] != key:
            return None
        return decode(ModelProfile, data["profile"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(key: Optional[str], profile: ModelProfile) -> None:
    """Keep ``profile`` under ``key``, replacing the file in one rename; silent where the folder is unwritable."""
    path = _path(key)
    if path is None:
        return
    text = json.dumps({"format": FORMAT, "key": key, "profile": encode(profile)})
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{key[:16]}-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _path(key: Optional[str]) -> Optional[str]:
    folder = cache_dir()
    return None if folder is None or key is None else os.path.join(folder, f"{key}.json")


def encode(value: Any) -> Any:
    """``value`` (a profile dataclass, or anything inside one) as JSON data: dataclasses as objects of all
    their fields, tuples as lists, dict keys as strings. Raises TypeError for any other type."""
    if dataclasses.is_dataclass(value):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"the profile cache cannot store {type(value).__name__}")


def decode(kind: Any, data: Any) -> Any:
    """The value of type ``kind`` (a dataclass or a typing annotation) that ``encode`` gave ``data``.
    Raises ValueError where ``data`` does not fit ``kind`` (a field missing or extra, another type)."""
    origin, args = get_origin(kind), get_args(kind)
    if dataclasses.is_dataclass(kind):
        hints = get_type_hints(kind)
        names = [f.name for f in dataclasses.fields(kind)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise ValueError(f"{kind.__name__}: not an object of the fields {sorted(names)}")
        return kind(**{name: decode(hints[name], data[name]) for name in names})
    if origin is Union:  # Optional[X]
        if data is None and type(None) in args:
            return None
        return decode(next(a for a in args if a is not type(None)), data)
    if origin is dict:
        keys = int if args[0] is int else str  # JSON's keys are text
        return {decode(args[0], keys(k)): decode(args[1], v) for k, v in _checked(data, dict).items()}
    if origin is tuple:
        items = _checked(data, list)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in items)
        if len(items) != len(args):
            raise ValueError(f"{len(items)} items for {kind}")
        return tuple(decode(a, v) for a, v in zip(args, items))
    if kind is int:
        return _checked(data, int)
    if kind is float:
        return _checked(data, (int, float))
    if kind in (bool, str):
        return _checked(data, kind)
    raise NotImplementedError(f"the profile cache cannot read {kind}")  # loud: a type the codec lacks


def _checked(data: Any, kind: Union[type, Tuple[type, ...]]) -> Any:
    if not isinstance(data, kind) or (isinstance(data, bool) and kind is not bool):
        raise ValueError(f"{data!r} is not {kind}")
    return data
