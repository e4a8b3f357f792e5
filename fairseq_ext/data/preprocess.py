"""Tokenized splits made once and cached on disk: batched ``datasets.map`` into Arrow files, reused while the
inputs stay the same.

A split's samples (the dataset type's output, cut to ``--sequence-length``, packed where asked) are stored
under ``--data-cache-dir`` (run.sh ``DATA_CACHE_DIR``; default ``$FAIRSEQ_EXT_DATA_CACHE`` or
``~/.cache/fairseq_ext/data``) in a folder named by a hash of everything that changes them: the record
files (path, size, modification time), the tokenizer (its serialized vocabulary and special tokens), the
chat template and prompt template texts, the task's data settings (dataset type and name, sequence length,
packing, ...), the model head's layout and the source code of the data modules and of the dataset type.
A later start with the same inputs memory-maps the stored Arrow files instead of tokenizing again.

Several processes may start at once (torchrun, several ranks on a node): the first to take the folder's
lock builds it in a temporary folder and renames it into place; the others wait on the lock and then read
it. Nothing half-written is ever read.
"""

import contextlib
import glob
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import datasets
from filelock import FileLock

from . import sources
from .sources import progress_on_stdout

logger = logging.getLogger(__name__)

DEFAULT_CACHE = os.path.join("~", ".cache", "fairseq_ext", "data")
CACHE_ENV = "FAIRSEQ_EXT_DATA_CACHE"
# task settings that never change the samples (they are left out of the cache key)
NOT_DATA_SETTINGS = {
    "_name",
    "data_cache_dir",
    "precision",
    "fp16",
    "bf16",
    "cpu",
    "update_freq",
    "trust_remote_code",
    "compile_layers",
    "speed_log",
    "profile_updates",
    "profile_dir",
    "use_lora",
    "lora_config",
    "plan_ngpus",
    "cube_scaling_factor",
    "plan_file",
    "use_zero",
    "zero_n_groups",
    "recompute_module_names",
    "offload_activations",
    "checkpoint_format",
    "optimizer_in_backward",
}
MIN_RECORDS_PER_PROCESS = 20000


def token_features() -> datasets.Features:
    """``input_ids`` and ``labels`` as int32 lists (half the disk and memory of Python's int64)."""
    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids})


def num_processes(num_records: int) -> Optional[int]:
    """Processes for a map over ``num_records``: one per core for large data, none (this process) otherwise."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = min(cores, num_records // MIN_RECORDS_PER_PROCESS)
    return wanted if wanted > 1 else None


def tokenize_map(
    records: datasets.Dataset, function: Callable, desc: str, batch_size: int = 1000, **map_kwargs
) -> datasets.Dataset:
    """``records.map(function, batched=True)`` into an Arrow file of the scratch folder, over as many processes
    as the data and the cores allow, with a progress bar; the records' columns are dropped."""
    num_proc = num_processes(len(records))
    if num_proc:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    fingerprint = hashlib.sha256(f"{records._fingerprint}|{desc}|{function.__qualname__}".encode()).hexdigest()[:32]
    with progress_on_stdout():
        samples = records.map(
            function,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc,
            desc=desc,
            remove_columns=records.column_names,
            load_from_cache_file=False,
            new_fingerprint=fingerprint,
            cache_file_name=scratch_file(fingerprint),
            **map_kwargs,
        )
    return samples.with_format(None)  # the records' format (Arrow batches for some functions) is theirs


def scratch_file(name: str) -> str:
    """An Arrow file name in the scratch folder (never beside the user's own data files)."""
    return os.path.join(sources.scratch_dir(), f"{name}.arrow")


def _hash_file(digest, path: str) -> None:
    with open(path, "rb") as f:
        digest.update(f.read())


def code_version(builder: Callable) -> str:
    """Hash of the data modules' source and of the dataset type's own module."""
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(here, "*.py")))
    try:
        files.append(inspect.getsourcefile(builder))
    except TypeError:
        pass
    for path in files:
        if path and os.path.isfile(path):
            _hash_file(digest, path)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what the tokenizer does: its serialized model (vocabulary, merges, normalizer) and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    for name in ("add_bos_token", "add_eos_token", "padding_side", "truncation_side"):
        digest.update(f"{name}={getattr(tokenizer, name, None)}".encode())
    return digest.hexdigest()


def data_fingerprint(data_dir: str, dataset_name: str) -> List[Tuple[str, int, int]]:
    """(path, size, modification time) of every file of every split's records (labels read all splits)."""
    out = []
    for split in ("train", "valid", "test"):
        source = sources.find_split_source(data_dir, dataset_name, split)
        if source is not None:
            for path in source.files():
                stat = os.stat(path)
                out.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    if not out and os.path.exists(data_dir):  # a dataset type of the user's own, reading its own files
        for path in sorted(glob.glob(os.path.join(data_dir, f"{dataset_name}*"))):
            if os.path.isfile(path):
                stat = os.stat(path)
                out.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return out


def template_texts(cfg, tokenizer) -> Dict[str, str]:
    """The text of the prompt template and of the chat template the settings select (names are not enough:
    a template registered or a file edited under the same name changes the samples)."""
    from .chat_templates import resolve_chat_template
    from .prompts import PROMPT_TEMPLATES

    out = {}
    prompt = PROMPT_TEMPLATES.get(getattr(cfg, "prompt_type", ""))
    if prompt is not None:
        out["prompt"] = prompt.with_input + "\0" + prompt.without_input
    if getattr(cfg, "dataset_type", "") == "chat":
        out["chat"] = resolve_chat_template(getattr(cfg, "chat_template", ""), tokenizer).text
    return out


def cache_key(cfg, split: str, tokenizer, layout_name: str, builder: Callable) -> Dict:
    """Everything that changes the samples of ``split`` (see the module docstring)."""
    settings = {k: v for k, v in _settings(cfg).items() if k not in NOT_DATA_SETTINGS}
    return {
        "split": split,
        "layout": layout_name,
        "settings": settings,
        "data": data_fingerprint(cfg.data, cfg.dataset_name),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "templates": template_texts(cfg, tokenizer),
        "code": code_version(builder),
    }


def _settings(cfg) -> Dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=False)
    except ImportError:
        pass
    return dict(vars(cfg))


def cache_root(cfg) -> str:
    root = getattr(cfg, "data_cache_dir", "") or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return os.path.abspath(os.path.expanduser(root))


@contextlib.contextmanager
def _scratch_in(path: str):
    sources._scratch.insert(0, path)
    try:
        yield
    finally:
        sources._scratch.remove(path)


def _keep_files(dataset: datasets.Dataset, folder: str) -> Optional[List[str]]:
    """Move the Arrow files behind ``dataset`` into ``folder`` when they hold exactly its rows and columns
    (no copy); None when they do not (then the dataset is written anew)."""
    files = [f["filename"] for f in dataset.cache_files]
    if not files or dataset._indices is not None:
        return None
    parts = [datasets.Dataset.from_file(f) for f in files]
    if sum(len(p) for p in parts) != len(dataset) or any(p.column_names != dataset.column_names for p in parts):
        return None
    if any(not os.path.abspath(f).startswith(sources.scratch_dir()) for f in files):
        return None
    names = []
    for i, path in enumerate(files):
        name = f"data-{i:05d}.arrow"
        shutil.move(path, os.path.join(folder, name))
        names.append(name)
    return names


def _load(folder: str) -> Tuple[datasets.Dataset, Dict]:
    with open(os.path.join(folder, "info.json"), encoding="utf-8") as f:
        info = json.load(f)
    if info["files"]:
        parts = [datasets.Dataset.from_file(os.path.join(folder, name)) for name in info["files"]]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    else:
        dataset = datasets.load_from_disk(os.path.join(folder, "dataset"), keep_in_memory=False)
    return dataset, info["stats"]


def cached_split(
    key: Dict, root: str, build: Callable[[], Tuple[datasets.Dataset, Dict]]
) -> Tuple[datasets.Dataset, Dict, bool]:
    """The samples of ``key`` from the cache, built by ``build() -> (samples, stats)`` on a miss.
    Returns the samples (memory-mapped), the stats of their making and whether they came from the cache."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    folder = os.path.join(root, f"{key['split']}-{digest[:24]}")
    if os.path.isfile(os.path.join(folder, "info.json")):
        return (*_load(folder), True)
    os.makedirs(root, exist_ok=True)
    with FileLock(folder + ".lock"):
        if os.path.isfile(os.path.join(folder, "info.json")):  # another process built it while this one waited
            return (*_load(folder), True)
        tmp = tempfile.mkdtemp(dir=root, prefix=f".{key['split']}-building-")
        try:
            scratch = os.path.join(tmp, "scratch")
            os.makedirs(scratch)
            with _scratch_in(scratch):
                samples, stats = build()
                files = _keep_files(samples, tmp)
                if files is None:
                    with progress_on_stdout():
                        samples.save_to_disk(os.path.join(tmp, "dataset"))
            shutil.rmtree(scratch, ignore_errors=True)
            with open(os.path.join(tmp, "key.json"), "w", encoding="utf-8") as f:
                json.dump(key, f, indent=1, default=str)
            with open(os.path.join(tmp, "info.json"), "w", encoding="utf-8") as f:
                json.dump({"files": files or [], "stats": stats}, f)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info(f"split {key['split']}: tokenized samples cached in {folder}")
    return (*_load(folder), False)
