"""The ``disk`` dataset type: a folder written by ``datasets``' ``save_to_disk``.

The folder holds a ``DatasetDict`` whose split names are ``train``, ``valid`` (or ``validation``) and
``test``. Columns, in the order they are looked for:
``input_ids`` (already tokenized, with the other columns of the model head's layout: ``labels``,
``label``, ``start_positions``/``end_positions`` or ``pair_input_ids``; with none of them, all tokens
are trained on as language modelling). A ``label`` column (class names or ids) is the data's label
set for sequence classification, read like the ``classification`` type's,
``instruction``/``output`` (+ optional ``input``: formatted with the prompt template, prompt masked),
``text`` (plain language modelling; EOS appended, every token trained on).
"""

import os
from typing import Optional

import datasets

from ..errors import UserInputError
from .instruction import tokenize_instruction_dataset
from .labels import LabelSet, label_set
from .preprocess import scratch_file, tokenize_map
from .registry import register_dataset_type

TARGET_COLUMNS = {"labels", "label", "start_positions", "pair_input_ids"}
SPLIT_ALIASES = {"valid": ("valid", "validation"), "train": ("train",), "test": ("test",)}


def has_split(path: str, split: str) -> bool:
    """Whether the ``save_to_disk`` folder at ``path`` holds ``split`` (under one of its names)."""
    loaded = datasets.load_from_disk(path, keep_in_memory=False)
    return any(name in loaded for name in SPLIT_ALIASES.get(split, (split,)))


def load_disk_split(path: str, split: str) -> datasets.Dataset:
    """Load one split of a ``save_to_disk`` folder, with errors that name the folder and the splits it has."""
    if not os.path.isdir(path):
        raise UserInputError(f"DATASET_PATH {path}: no such folder (expected a datasets.save_to_disk folder)")
    try:
        loaded = datasets.load_from_disk(path, keep_in_memory=False)
    except FileNotFoundError as err:
        raise UserInputError(f"DATASET_PATH {path} is not a folder written by datasets' save_to_disk ({err})") from None
    if isinstance(loaded, datasets.Dataset):
        raise UserInputError(
            f"DATASET_PATH {path} holds a single Dataset; save a DatasetDict with train/valid/test splits"
        )
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in loaded:
            ds = loaded[name]
            if len(ds) == 0:
                raise UserInputError(f"DATASET_PATH {path}: split {name!r} is empty")
            return ds
    raise UserInputError(f"DATASET_PATH {path} has no split {split!r}; it has: {', '.join(loaded.keys())}")


def _tokenize_text(batch, tokenizer):
    ids = [list(x) + [tokenizer.eos_token_id] for x in tokenizer(batch["text"])["input_ids"]]
    return {"input_ids": ids, "labels": ids}


def _label_all(batch):
    return {"labels": batch["input_ids"]}


def read_disk_labels(cfg) -> Optional[LabelSet]:
    """The label set of a ``label`` column (None without one); valid/test may only use labels train has."""
    splits = {
        split: load_disk_split(cfg.data, split)
        for split in ("train", "valid", "test")
        if split == "train" or has_split(cfg.data, split)
    }
    if "label" not in splits["train"].column_names:
        return None
    return label_set({split: ds["label"] for split, ds in splits.items()})


@register_dataset_type("disk", labels=read_disk_labels)
def build_disk_split(cfg, split: str, tokenizer):
    """Builder for ``DATASET_TYPE=disk``."""
    ds = load_disk_split(cfg.data, split)
    columns = set(ds.column_names)
    if "input_ids" in columns:
        if not columns & TARGET_COLUMNS:
            ds = ds.map(_label_all, batched=True, cache_file_name=scratch_file(f"labels-{ds._fingerprint}"))
        if "label" in columns:
            labels = read_disk_labels(cfg)
            ds = ds.map(
                lambda row: {"label": labels.index(row["label"])},
                cache_file_name=scratch_file(f"label-ids-{ds._fingerprint}"),
            )
        return ds
    if {"instruction", "output"} <= columns:
        return tokenize_instruction_dataset(ds, tokenizer, cfg.prompt_type, split)
    if "text" in columns:
        if tokenizer.eos_token_id is None:
            raise UserInputError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
        return tokenize_map(ds, _tokenize_text, desc=f"tokenizing {split}", fn_kwargs={"tokenizer": tokenizer})
    raise UserInputError(
        f"DATASET_PATH {cfg.data} split {split!r} has columns {sorted(columns)}; expected input_ids "
        "(optionally labels), instruction + output (optionally input), or text"
    )
