"""Tokenized datasets: truncation counts, dynamic padding, shifted targets, length-aware order."""

import logging

import datasets
import numpy as np
import pytest
import torch

from fairseq_ext.data.instruction import IGNORE_INDEX
from fairseq_ext.data.tokenized import TokenizedDataset, collate, to_hf_dataset, truncate
from fairseq_ext.errors import UserInputError


def test_collate_pads_to_longest_and_shifts_targets():
    samples = [
        {"id": 0, "input_ids": torch.tensor([1, 5, 6, 7]), "labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 6, 7])},
        {"id": 1, "input_ids": torch.tensor([1, 8]), "labels": torch.tensor([IGNORE_INDEX, 8])},
    ]
    batch = collate(samples, pad_id=0)
    assert batch["net_input"]["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert batch["net_input"]["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # target[t] is the label of token t+1
    assert batch["target"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["ntokens"] == 3 and batch["nsentences"] == 2
    assert batch["id"].tolist() == [0, 1]


def test_truncation_is_counted_and_answerless_samples_dropped(caplog):
    samples = to_hf_dataset([
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},            # fits
        {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]},  # truncated, keeps token 3
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, -100, 5]},  # truncated, nothing left
    ])
    with caplog.at_level(logging.INFO):
        out = truncate(samples, max_length=3, split="train")
    assert out["input_ids"] == [[1, 2, 3], [1, 2, 3]]
    assert out["labels"] == [[-100, 2, 3], [-100, -100, 3]]
    assert "2 truncated to SEQUENCE_LENGTH=3, 1 dropped" in caplog.text


def test_all_samples_dropped_is_an_error():
    samples = to_hf_dataset([{"input_ids": [1, 2, 3], "labels": [-100, -100, 3]}])
    with pytest.raises(UserInputError, match="no sample has an answer token within SEQUENCE_LENGTH=2"):
        truncate(samples, max_length=2, split="valid")


def test_ordered_indices_sort_by_length_after_shuffle():
    lengths = [5, 2, 9, 2, 7]
    ds = TokenizedDataset(datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths],
                                                      "labels": [[1] * n for n in lengths]}), pad_id=0)
    np.random.seed(0)
    order = ds.ordered_indices()
    assert sorted(order.tolist()) == list(range(5))
    assert [lengths[i] for i in order] == sorted(lengths)
    assert ds.num_tokens_vec(np.array([0, 2])).tolist() == [5, 9]


def test_builder_output_needs_labels():
    with pytest.raises(UserInputError, match="missing \\['labels'\\]"):
        to_hf_dataset(datasets.Dataset.from_dict({"input_ids": [[1, 2]]}))
