"""Tokenized samples as a fairseq dataset: truncation, length-aware ordering, dynamic padding."""

import logging
from typing import Dict, List, Union

import datasets
import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..errors import UserInputError
from .layouts import SampleLayout

logger = logging.getLogger(__name__)


def to_hf_dataset(samples: Union[datasets.Dataset, List[Dict]], layout: SampleLayout) -> datasets.Dataset:
    """Accept a builder's output (``datasets.Dataset`` or list of dicts) and arrange it for ``layout``."""
    if isinstance(samples, list):
        if not samples:
            raise UserInputError("the dataset builder returned no samples")
        samples = datasets.Dataset.from_list(samples)
    columns = layout.columns(samples.column_names)
    samples = samples.select_columns(columns)
    if type(layout).prepare is not SampleLayout.prepare:
        samples = samples.map(layout.prepare, keep_in_memory=True)
    return samples


def truncate(samples: datasets.Dataset, layout: SampleLayout, max_length: int, split: str) -> datasets.Dataset:
    """Cut samples to ``max_length`` tokens, drop those left with nothing to learn, and log the counts."""
    sequence_columns = [c for c in samples.column_names
                        if c in layout.sequence_columns or c in layout.optional_sequence_columns]
    too_long = [i for i, row in enumerate(samples.select_columns(sequence_columns))
                if any(len(row[c]) > max_length for c in sequence_columns)]
    if too_long:
        samples = samples.map(layout.cut, fn_kwargs={"max_length": max_length}, keep_in_memory=True)
    keep = [i for i, row in enumerate(samples) if layout.trainable(row)]
    num_dropped = len(samples) - len(keep)
    if num_dropped:
        samples = samples.select(keep, keep_in_memory=True)
    logger.info(
        f"split {split}: {len(samples)} samples; {len(too_long)} truncated to SEQUENCE_LENGTH={max_length}, "
        f"{num_dropped} dropped with nothing left to learn (no answer token or label)"
    )
    if too_long:
        logger.warning(f"split {split}: {len(too_long)} samples were longer than SEQUENCE_LENGTH={max_length} "
                       f"and were truncated")
    if len(samples) == 0:
        raise UserInputError(f"split {split}: no sample has an answer token or label within "
                             f"SEQUENCE_LENGTH={max_length}; raise SEQUENCE_LENGTH")
    return samples


class TokenizedDataset(FairseqDataset):
    """A split of tokenized samples, batched by ``layout`` with dynamic padding.

    ``ordered_indices`` shuffles (under the seed fairseq sets per epoch) and then sorts by length,
    as fairseq's own datasets do, so batches built by ``--max-tokens`` waste little padding. Samples
    that share a ``group`` stay next to each other (so in one batch unless it ends between them):
    groups are shuffled and sorted by their longest sample.
    """

    def __init__(self, samples: datasets.Dataset, layout: SampleLayout, pad_id: int, shuffle: bool = True):
        self.samples = samples.with_format("torch")
        self.layout = layout
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.sizes = np.fromiter((layout.size(row) for row in samples), dtype=np.int64, count=len(samples))
        self.groups = None
        if "group" in samples.column_names:
            self.groups = np.unique(np.asarray(samples["group"]), return_inverse=True)[1].reshape(-1)
            self.samples = self.samples.remove_columns("group")

    def __getitem__(self, index: int) -> Dict:
        row = {k: v.long() for k, v in self.samples[int(index)].items()}
        row["id"] = int(index)
        return row

    def __len__(self) -> int:
        return len(self.sizes)

    def collater(self, samples: List[Dict]) -> Dict:
        return self.layout.collate(samples, self.pad_id)

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return self.sizes[indices]

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        """fairseq's batches, and the samples they leave out: this fairseq drops a last batch whose size is no
        multiple of ``--required-batch-size-multiple`` (default 8), which empties a split of fewer samples (a
        small valid split, or one packed into a few rows). Those samples come as one last, smaller batch."""
        batches = list(super().batch_by_size(indices, max_tokens=max_tokens, max_sentences=max_sentences,
                                             required_batch_size_multiple=required_batch_size_multiple))
        covered = sum(len(batch) for batch in batches)  # fairseq's batches cover the indices in order
        if covered < len(indices):
            batches.append(np.asarray(indices[covered:], dtype=np.int64))
        return batches

    def ordered_indices(self) -> np.ndarray:
        if self.groups is not None:
            return self._grouped_order()
        if self.shuffle:
            order = np.random.permutation(len(self))
        else:
            order = np.arange(len(self))
        return order[np.argsort(self.sizes[order], kind="mergesort")]

    def _grouped_order(self) -> np.ndarray:
        num_groups = int(self.groups.max()) + 1
        rank = np.random.permutation(num_groups) if self.shuffle else np.arange(num_groups)
        longest = np.zeros(num_groups, dtype=np.int64)
        np.maximum.at(longest, self.groups, self.sizes)
        # sort keys, last one first: group's longest sample, then the group's (shuffled) rank, then position
        return np.lexsort((np.arange(len(self)), rank[self.groups], longest[self.groups]))
