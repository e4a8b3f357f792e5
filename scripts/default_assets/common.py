"""Pieces every default dataset shares: split sizes, held-out partitions of word pools, JSON lines output."""

import json
import random
from typing import Callable, Dict, Hashable, List, Sequence, Tuple

SPLITS = ("train", "valid", "test")
SPLIT_SIZES = {"train": 2000, "valid": 200, "test": 200}


def partition(pool: Sequence[str], every: int = 5) -> Dict[str, List[str]]:
    """Split a word pool into disjoint train/valid/test parts by position.

    Entry ``i`` goes to test when ``i % every == 0``, to valid when ``i % every == 1``, else to train,
    so valid and test each get about a fifth of the pool and never share an entry with train.
    """
    parts = {name: [] for name in SPLITS}
    for i, entry in enumerate(pool):
        parts["test" if i % every == 0 else "valid" if i % every == 1 else "train"].append(entry)
    return parts


def split_pools(pools: Dict[str, Sequence[str]]) -> Dict[str, Dict[str, List[str]]]:
    """``{split: {pool_name: entries}}`` from ``{pool_name: pool}``, each pool partitioned on its own."""
    parted = {name: partition(pool) for name, pool in pools.items()}
    return {split: {name: parted[name][split] for name in pools} for split in SPLITS}


def make_unique(
    rng: random.Random, make: Callable[[random.Random], Tuple[Hashable, dict]], size: int, seen: set
) -> List[dict]:
    """``size`` records from ``make(rng)``, which returns ``(key, record)``; a key already in ``seen`` is redrawn.

    The loop is bounded so that a pool too small for ``size`` distinct records fails loudly instead of hanging.
    """
    records = []
    for _ in range(size * 50):
        if len(records) == size:
            return records
        key, record = make(rng)
        if key not in seen:
            seen.add(key)
            records.append(record)
    if len(records) == size:
        return records
    raise AssertionError(f"only {len(records)} distinct records of {size}: the word pools are too small")


def write_jsonl(path: str, records: list) -> None:
    """One JSON object per line (the format fairseq_ext's JSON loaders read)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
