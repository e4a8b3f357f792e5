"""Sample layouts and tokenized datasets: truncation counts, dynamic padding, targets per head, order."""

import logging

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fairseq_ext.data.layouts import IGNORE_INDEX, get_layout
from fairseq_ext.data.tokenized import TokenizedDataset, to_hf_dataset, truncate
from fairseq_ext.errors import UserInputError
from tests.helpers import MODEL_DIR

X = IGNORE_INDEX


def rows(*dicts):
    return [{"id": i, **{k: torch.tensor(v) for k, v in d.items()}} for i, d in enumerate(dicts)]


def test_causal_lm_pads_to_longest_and_shifts_targets():
    batch = get_layout("causal_lm").collate(
        rows({"input_ids": [1, 5, 6, 7], "labels": [X, X, 6, 7]}, {"input_ids": [1, 8], "labels": [X, 8]}), pad_id=0
    )
    assert batch["net_input"]["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    # no mask: pad tokens come after every real token (test_padded_rows_need_no_mask)
    assert "attention_mask" not in batch["net_input"]
    # target[t] is the label of token t+1
    assert batch["target"].tolist() == [[X, 6, 7, X], [8, X, X, X]]
    assert batch["ntokens"] == 3 and batch["nsentences"] == 2
    assert batch["id"].tolist() == [0, 1]


def test_causal_lm_batch_without_padding_has_no_attention_mask():
    """The model then uses the plain causal mask (what a mask of ones gives) without checking a mask."""
    batch = get_layout("causal_lm").collate(
        rows({"input_ids": [1, 5, 6], "labels": [X, 5, 6]}, {"input_ids": [1, 8, 9], "labels": [X, 8, 9]}), pad_id=0
    )
    assert "attention_mask" not in batch["net_input"]
    assert batch["net_input"]["input_ids"].tolist() == [[1, 5, 6], [1, 8, 9]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR)).eval()
    ids = batch["net_input"]["input_ids"]
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids).logits, model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        )


def test_padded_rows_need_no_mask():
    """A padded causal LM batch without a mask gives every real token the logits Hugging Face's padding mask
    gives it: pad tokens come after the row's real tokens, which the causal mask keeps them from seeing."""
    samples = [[1, 5, 6, 7, 9, 4], [1, 8], [1, 3, 3, 2]]
    batch = get_layout("causal_lm").collate(rows(*({"input_ids": s, "labels": s} for s in samples)), pad_id=0)
    ids = batch["net_input"]["input_ids"]
    assert "attention_mask" not in batch["net_input"] and ids.shape == (3, 6)
    mask = torch.tensor([[1] * len(s) + [0] * (6 - len(s)) for s in samples])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR)).eval()
    with torch.no_grad():
        plain, masked = model(input_ids=ids).logits, model(input_ids=ids, attention_mask=mask).logits
    for row, sample in enumerate(samples):
        torch.testing.assert_close(plain[row, : len(sample)], masked[row, : len(sample)], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain[1, 2:], masked[1, 2:])  # the pad tokens' own outputs differ (never trained)


def test_seq2seq_lm_splits_the_masked_prompt_from_the_answer():
    layout = get_layout("seq2seq_lm")
    row = layout.prepare({"input_ids": [1, 5, 6, 7, 2], "labels": [X, X, X, 7, 2]})
    assert row == {"input_ids": [1, 5, 6], "labels": [7, 2]}
    batch = layout.collate(rows(row, {"input_ids": [1, 9], "labels": [4, 4, 2]}), pad_id=0)
    assert batch["net_input"]["input_ids"].tolist() == [[1, 5, 6], [1, 9, 0]]
    assert batch["net_input"]["labels"].tolist() == batch["target"].tolist() == [[7, 2, X], [4, 4, 2]]
    assert batch["ntokens"] == 5
    with pytest.raises(UserInputError, match="a seq2seq sample needs a prompt"):
        layout.prepare({"input_ids": [1, 2], "labels": [1, 2]})


def test_classification_layouts_keep_labels_and_token_types():
    batch = get_layout("seq_cls").collate(
        rows(
            {"input_ids": [1, 5, 2, 6, 2], "token_type_ids": [0, 0, 0, 1, 1], "label": 2},
            {"input_ids": [1, 7, 2], "token_type_ids": [0, 0, 0], "label": 0},
        ),
        pad_id=9,
    )
    assert batch["target"].tolist() == [2, 0]
    assert batch["net_input"]["token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert batch["net_input"]["input_ids"][1].tolist() == [1, 7, 2, 9, 9]
    tokens = get_layout("token_cls").collate(
        rows({"input_ids": [1, 5, 6, 2], "labels": [X, 3, X, X]}, {"input_ids": [1, 7, 2], "labels": [X, 0, X]}),
        pad_id=0,
    )
    assert tokens["target"].tolist() == [[X, 3, X, X], [X, 0, X, X]] and tokens["ntokens"] == 2


def test_question_answering_targets_and_cut_answers():
    layout = get_layout("qa")
    batch = layout.collate(
        rows(
            {"input_ids": [1, 5, 6, 7], "start_positions": 2, "end_positions": 3},
            {"input_ids": [1, 8], "start_positions": 1, "end_positions": 1},
        ),
        pad_id=0,
    )
    assert batch["target"].tolist() == [[2, 3], [1, 1]]
    assert not layout.trainable(layout.cut({"input_ids": [1, 5, 6, 7], "start_positions": 2, "end_positions": 3}, 3))
    assert not layout.trainable({"input_ids": [1, 5], "start_positions": -1, "end_positions": -1})


def test_embedding_pairs_get_their_own_masks():
    batch = get_layout("embedding").collate(
        rows({"input_ids": [1, 5], "pair_input_ids": [1, 6, 7]}, {"input_ids": [1, 8, 9], "pair_input_ids": [1]}),
        pad_id=0,
    )
    assert batch["pair_input"]["input_ids"].tolist() == [[1, 6, 7], [1, 0, 0]]
    assert batch["pair_input"]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["net_input"]["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_truncation_is_counted_and_answerless_samples_dropped(caplog):
    layout = get_layout("causal_lm")
    samples = to_hf_dataset(
        [
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},  # fits
            {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]},  # truncated, keeps token 3
            {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, -100, 5]},  # truncated, nothing left
        ],
        layout,
    )
    with caplog.at_level(logging.INFO):
        out = truncate(samples, layout, max_length=3, split="train")
    assert out["input_ids"] == [[1, 2, 3], [1, 2, 3]]
    assert out["labels"] == [[-100, 2, 3], [-100, -100, 3]]
    assert "2 truncated to SEQUENCE_LENGTH=3, 1 dropped" in caplog.text


def test_all_samples_dropped_is_an_error():
    layout = get_layout("causal_lm")
    samples = to_hf_dataset([{"input_ids": [1, 2, 3], "labels": [-100, -100, 3]}], layout)
    with pytest.raises(UserInputError, match="no sample has an answer token or label within SEQUENCE_LENGTH=2"):
        truncate(samples, layout, max_length=2, split="valid")


@pytest.mark.parametrize("num_samples, sizes", [(5, [5]), (6, [6]), (45, [32, 8, 5]), (200, [32] * 6 + [8])])
def test_batches_keep_every_sample_under_the_required_batch_size_multiple(num_samples, sizes):
    """fairseq drops a last batch whose size is no multiple of --required-batch-size-multiple; a split of
    fewer samples than that (a small valid split, or one packed into a few rows) would make no batch."""
    ds = TokenizedDataset(
        datasets.Dataset.from_dict({"input_ids": [[1] * 4] * num_samples, "labels": [[1] * 4] * num_samples}),
        get_layout("causal_lm"),
        pad_id=0,
        shuffle=False,
    )
    indices = ds.ordered_indices()
    batches = ds.batch_by_size(indices, max_sentences=32, required_batch_size_multiple=8)
    assert [len(b) for b in batches] == sizes
    assert np.concatenate(batches).tolist() == indices.tolist()


def test_ordered_indices_sort_by_length_after_shuffle():
    lengths = [5, 2, 9, 2, 7]
    ds = TokenizedDataset(
        datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths]}),
        get_layout("causal_lm"),
        pad_id=0,
    )
    np.random.seed(0)
    order = ds.ordered_indices()
    assert sorted(order.tolist()) == list(range(5))
    assert [lengths[i] for i in order] == sorted(lengths)
    assert ds.num_tokens_vec(np.array([0, 2])).tolist() == [5, 9]
    assert ds[1]["input_ids"].tolist() == [1, 1] and ds[1]["id"] == 1


@pytest.mark.parametrize(
    "layout,columns,missing",
    [
        ("causal_lm", {"input_ids": [[1, 2]]}, "labels"),
        ("seq_cls", {"input_ids": [[1, 2]], "labels": [[1, 2]]}, "label"),
        ("embedding", {"input_ids": [[1, 2]]}, "pair_input_ids"),
    ],
)
def test_builder_output_needs_the_layouts_columns(layout, columns, missing):
    with pytest.raises(UserInputError, match=rf"missing \['{missing}'\].*check DATASET_TYPE against MODEL_ARCH"):
        to_hf_dataset(datasets.Dataset.from_dict(columns), get_layout(layout))


def test_groups_stay_together_after_shuffle():
    groups = [0, 1, 2, 0, 1, 2, 3, 3]
    lengths = [4, 6, 4, 5, 6, 3, 9, 9]
    data = datasets.Dataset.from_dict(
        {"input_ids": [[1] * n for n in lengths], "pair_input_ids": [[1]] * 8, "group": groups}
    )
    ds = TokenizedDataset(to_hf_dataset(data, get_layout("embedding")), get_layout("embedding"), pad_id=0)
    for seed in range(5):
        np.random.seed(seed)
        order = ds.ordered_indices().tolist()
        assert sorted(order) == list(range(8))
        seen = [groups[i] for i in order]
        assert all(seen[k] == seen[k + 1] for k in range(0, 8, 2)), seen  # each group's two members adjacent
        assert seen[-2:] == [3, 3]  # the group with the longest samples comes last
    assert "group" not in ds[0]
