"""Sequence packing for causal LM samples (``--pack-sequences``, run.sh ``PACK_SEQUENCES=1``).

Short instruction samples padded to the longest of their batch spend most of the batch's FLOPs on
padding. Packing puts several samples into one row of at most SEQUENCE_LENGTH tokens and restarts
``position_ids`` at 0 for each; the model is then called with those position ids and no attention
mask, from which Hugging Face builds a block-diagonal causal mask (no attention across samples;
flash-attn 2 takes the same position ids as varlen boundaries). Each sample's first label becomes
-100: after the shift to next-token targets, no token of one sample is trained to predict the next
sample. The summed loss of a packed batch is the unpacked batch's, to float rounding.
"""

import bisect
import logging
from typing import List, Sequence

import datasets

from ..errors import UserInputError
from .layouts import IGNORE_INDEX

logger = logging.getLogger(__name__)

PACKED_COLUMNS = ("input_ids", "labels")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Indices of ``lengths`` grouped into bins of total length <= ``capacity``: longest first, each into
    the fullest bin it fits (indices in their original order inside a bin)."""
    free: List[tuple] = []  # (room left, bin), sorted
    bins: List[List[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, target = free.pop(slot)
        else:
            room, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        if room - length > 0:
            bisect.insort(free, (room - length, target))
    return [sorted(b) for b in bins]


def pack(samples: datasets.Dataset, max_length: int, split: str) -> datasets.Dataset:
    """Pack causal LM ``samples`` (columns input_ids and labels, already cut to ``max_length``) into rows of
    at most ``max_length`` tokens with input_ids, labels and position_ids (see the module docstring)."""
    extra = [c for c in samples.column_names if c not in PACKED_COLUMNS]
    if extra:
        raise UserInputError(
            f"PACK_SEQUENCES=1 packs samples with columns input_ids and labels only; this data "
            f"also has {extra}; set PACK_SEQUENCES=0"
        )
    input_ids, labels = samples["input_ids"], samples["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    bins = best_fit_decreasing([len(ids) for ids in input_ids], max_length)
    for members in bins:
        row_ids, row_labels, row_positions = [], [], []
        for i in members:
            row_ids += input_ids[i]
            row_labels += [IGNORE_INDEX] + list(labels[i][1:])
            row_positions += range(len(input_ids[i]))
        rows["input_ids"].append(row_ids)
        rows["labels"].append(row_labels)
        rows["position_ids"].append(row_positions)
    tokens = sum(len(r) for r in rows["input_ids"])
    logger.info(
        f"split {split}: packed {len(samples)} samples into {len(bins)} rows of up to {max_length} tokens "
        f"({100 * tokens / (len(bins) * max_length):.1f}% full)"
    )
    return datasets.Dataset.from_dict(rows)
