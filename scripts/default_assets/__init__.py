"""Generators of the shipped default datasets beyond toy_instructions, and of the tiny-t5 model folder.

Each dataset module exposes ``DATASET_NAME`` and ``make_splits(seed) -> {split: records}``; valid and test
are built from held-out parts of the word pools in :mod:`.vocab`, never seen in train.
"""

import os

from . import chat, ner, pairs, qa, sentiment
from .common import SPLITS, write_jsonl

DATASETS = {module.DATASET_NAME: module for module in (sentiment, ner, qa, pairs, chat)}


def write_datasets(data_dir: str) -> None:
    """Write ``{data_dir}/{name}_{split}.json`` for every dataset of DATASETS."""
    os.makedirs(data_dir, exist_ok=True)
    for name, module in DATASETS.items():
        splits = module.make_splits()
        for split in SPLITS:
            write_jsonl(os.path.join(data_dir, f"{name}_{split}.json"), splits[split])
