"""Tokenized samples as a fairseq dataset: truncation, length-aware ordering, dynamic padding."""

import logging
from typing import Dict, List, Union

import datasets
import numpy as np
import torch
from fairseq.data import FairseqDataset

from ..errors import UserInputError
from .instruction import IGNORE_INDEX

logger = logging.getLogger(__name__)


def to_hf_dataset(samples: Union[datasets.Dataset, List[Dict]]) -> datasets.Dataset:
    """Accept a builder's output (``datasets.Dataset`` or list of dicts) and check its columns."""
    if isinstance(samples, list):
        samples = datasets.Dataset.from_list(samples) if samples else datasets.Dataset.from_dict(
            {"input_ids": [], "labels": []})
    missing = {"input_ids", "labels"} - set(samples.column_names)
    if missing:
        raise UserInputError(f"a dataset builder must return input_ids and labels; missing {sorted(missing)}")
    return samples


def truncate(samples: datasets.Dataset, max_length: int, split: str) -> datasets.Dataset:
    """Cut samples to ``max_length`` tokens, drop those left without a trained token, and log the counts."""
    lengths = np.fromiter((len(x) for x in samples["input_ids"]), dtype=np.int64, count=len(samples))
    num_truncated = int((lengths > max_length).sum())

    def cut(batch):
        return {key: [x[:max_length] for x in batch[key]] for key in ("input_ids", "labels")}

    if num_truncated:
        samples = samples.map(cut, batched=True, keep_in_memory=True)
    keep = [i for i, labels in enumerate(samples["labels"]) if any(t != IGNORE_INDEX for t in labels[1:])]
    num_dropped = len(samples) - len(keep)
    if num_dropped:
        samples = samples.select(keep, keep_in_memory=True)
    logger.info(
        f"split {split}: {len(samples)} samples; {num_truncated} truncated to SEQUENCE_LENGTH={max_length}, "
        f"{num_dropped} dropped with no answer token left"
    )
    if num_truncated:
        logger.warning(f"split {split}: {num_truncated} of {len(lengths)} samples were longer than "
                       f"SEQUENCE_LENGTH={max_length} and were truncated")
    if len(samples) == 0:
        raise UserInputError(f"split {split}: no sample has an answer token within SEQUENCE_LENGTH={max_length}")
    return samples


def collate(samples: List[Dict], pad_id: int) -> Dict:
    """Pad a list of samples to the longest one and build fairseq's sample dict.

    ``target[b, t]`` is the label of the token that follows position ``t`` (labels are shifted here,
    once), ``-100`` where nothing is trained; ``ntokens`` counts trained targets.
    """
    if not samples:
        return {}
    batch_size = len(samples)
    max_len = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((batch_size, max_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
    labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"]
        attention_mask[row, :n] = 1
        labels[row, :n] = s["labels"]
    target = torch.cat([labels[:, 1:], labels.new_full((batch_size, 1), IGNORE_INDEX)], dim=1)  # (B, T)
    return {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "nsentences": batch_size,
        "ntokens": int((target != IGNORE_INDEX).sum()),
        "net_input": {"input_ids": input_ids, "attention_mask": attention_mask},
        "target": target,
    }


class TokenizedDataset(FairseqDataset):
    """A split of tokenized samples (``input_ids``, ``labels``), batched with dynamic padding.

    ``ordered_indices`` shuffles (under the seed fairseq sets per epoch) and then sorts by length,
    as fairseq's own datasets do, so batches built by ``--max-tokens`` waste little padding.
    """

    def __init__(self, samples: datasets.Dataset, pad_id: int, shuffle: bool = True):
        self.samples = samples
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.sizes = np.fromiter((len(x) for x in samples["input_ids"]), dtype=np.int64, count=len(samples))

    def __getitem__(self, index: int) -> Dict:
        row = self.samples[int(index)]
        return {
            "id": int(index),
            "input_ids": torch.tensor(row["input_ids"], dtype=torch.long),
            "labels": torch.tensor(row["labels"], dtype=torch.long),
        }

    def __len__(self) -> int:
        return len(self.sizes)

    def collater(self, samples: List[Dict]) -> Dict:
        return collate(samples, self.pad_id)

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return self.sizes[indices]

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def ordered_indices(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.permutation(len(self))
        else:
            order = np.arange(len(self))
        return order[np.argsort(self.sizes[order], kind="mergesort")]
