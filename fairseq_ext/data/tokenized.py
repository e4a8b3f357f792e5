"""Tokenized samples as a fairseq dataset: truncation, length-aware ordering, dynamic padding."""

import logging
from typing import Dict, List, Optional, Union

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from fairseq.data import FairseqDataset

from ..errors import UserInputError
from .layouts import IGNORE_INDEX, SampleLayout
from .preprocess import scratch_file

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
        samples = samples.map(layout.prepare, cache_file_name=scratch_file(f"prepare-{samples._fingerprint}"))
    return samples


def column_lengths(samples: datasets.Dataset, column: str) -> np.ndarray:
    """Length of every row's list in ``column``, read from the Arrow offsets (no rows made in Python)."""
    table = samples.with_format("arrow")[:]
    return pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False).astype(np.int64)


def sample_sizes(samples: datasets.Dataset, layout: SampleLayout) -> np.ndarray:
    """``layout.size`` of every row: the longest of its ``size_columns``."""
    columns = [c for c in layout.size_columns if c in samples.column_names]
    if not columns:
        return np.fromiter((layout.size(row) for row in samples), dtype=np.int64, count=len(samples))
    return np.maximum.reduce([column_lengths(samples, c) for c in columns])


def trained_counts(samples: datasets.Dataset, column: str, first: int) -> np.ndarray:
    """Per row, the labels other than -100 in ``column`` from position ``first`` on (chunk by chunk)."""
    counts = []
    for chunk in samples.with_format("arrow")[:].column(column).chunks:
        offsets = chunk.offsets.to_numpy().astype(np.int64)
        trained = np.concatenate([[0], np.cumsum(chunk.values.to_numpy(zero_copy_only=False) != IGNORE_INDEX)])
        starts = np.minimum(offsets[:-1] + first, offsets[1:])
        counts.append(trained[offsets[1:]] - trained[starts])
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def trainable_rows(samples: datasets.Dataset, layout: SampleLayout) -> np.ndarray:
    """Boolean mask of the rows ``layout.trainable`` keeps (column-wise where the layout says how)."""
    if layout.trained_labels is not None and layout.trained_labels[0] in samples.column_names:
        return trained_counts(samples, *layout.trained_labels) > 0
    if type(layout).trainable is SampleLayout.trainable:
        return np.ones(len(samples), dtype=bool)
    return np.fromiter((layout.trainable(row) for row in samples), dtype=bool, count=len(samples))


def truncate(
    samples: datasets.Dataset, layout: SampleLayout, max_length: int, split: str, stats: Optional[Dict] = None
) -> datasets.Dataset:
    """Cut samples to ``max_length`` tokens, drop those left with nothing to learn, and log the counts
    (also written into ``stats``: samples, truncated, dropped)."""
    sequence_columns = [
        c for c in samples.column_names if c in layout.sequence_columns or c in layout.optional_sequence_columns
    ]
    longest = np.maximum.reduce([column_lengths(samples, c) for c in sequence_columns])
    num_too_long = int((longest > max_length).sum())
    if num_too_long:
        samples = samples.map(
            _cut_batch,
            batched=True,
            fn_kwargs={"layout": layout, "max_length": max_length},
            cache_file_name=scratch_file(f"cut-{samples._fingerprint}-{max_length}"),
        )
    keep = trainable_rows(samples, layout)
    num_dropped = int(len(samples) - keep.sum())
    if num_dropped:
        samples = samples.select(np.flatnonzero(keep))
    if stats is not None:
        stats.update(samples=len(samples), truncated=num_too_long, dropped=num_dropped)
    report_truncation(split, max_length, len(samples), num_too_long, num_dropped)
    if len(samples) == 0:
        raise UserInputError(
            f"split {split}: no sample has an answer token or label within "
            f"SEQUENCE_LENGTH={max_length}; raise SEQUENCE_LENGTH"
        )
    return samples


def report_truncation(split: str, max_length: int, samples: int, truncated: int, dropped: int) -> None:
    """Log what truncation did to a split (again when its samples come from the cache)."""
    logger.info(
        f"split {split}: {samples} samples; {truncated} truncated to SEQUENCE_LENGTH={max_length}, "
        f"{dropped} dropped with nothing left to learn (no answer token or label)"
    )
    if truncated:
        logger.warning(
            f"split {split}: {truncated} samples were longer than SEQUENCE_LENGTH={max_length} and were truncated"
        )


def _cut_batch(batch: Dict[str, list], layout: SampleLayout, max_length: int) -> Dict[str, list]:
    rows = [layout.cut({c: batch[c][i] for c in batch}, max_length) for i in range(len(next(iter(batch.values()))))]
    return {c: [row[c] for row in rows] for c in batch}


class TokenizedDataset(FairseqDataset):
    """A split of tokenized samples, batched by ``layout`` with dynamic padding.

    ``ordered_indices`` shuffles (under the seed fairseq sets per epoch) and then sorts by length,
    as fairseq's own datasets do, so batches built by ``--max-tokens`` waste little padding. Samples
    that share a ``group`` stay next to each other (so in one batch unless it ends between them):
    groups are shuffled and sorted by their longest sample. ``padding_free`` (causal LM samples, not
    packed): each sample comes as a document of its own, positions from 0 and its first label ignored (never
    a target of its own), so that a batch is one padding-free row of its samples (``layouts.padding_free``).
    """

    def __init__(
        self,
        samples: datasets.Dataset,
        layout: SampleLayout,
        pad_id: int,
        shuffle: bool = True,
        padding_free: bool = False,
    ):
        self.samples = samples.with_format("torch")
        self.padding_free = padding_free
        self.layout = layout
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.sizes = sample_sizes(samples, layout)
        self.groups = None
        if "group" in samples.column_names:
            self.groups = np.unique(np.asarray(samples["group"]), return_inverse=True)[1].reshape(-1)
            self.samples = self.samples.remove_columns("group")

    def __getitem__(self, index: int) -> Dict:
        row = {k: v.long() for k, v in self.samples[int(index)].items()}
        row["id"] = int(index)
        if self.padding_free and "position_ids" not in row:
            row["position_ids"] = torch.arange(len(row["input_ids"]))
            row["labels"][0] = IGNORE_INDEX
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
        batches = list(
            super().batch_by_size(
                indices,
                max_tokens=max_tokens,
                max_sentences=max_sentences,
                required_batch_size_multiple=required_batch_size_multiple,
            )
        )
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
