"""Sequence packing: rows within SEQUENCE_LENGTH that keep every token, and the unpacked batch's loss."""

import random

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from fairseq_ext.criterions.lm_loss import CausalLMLoss
from fairseq_ext.data.layouts import IGNORE_INDEX, get_layout
from fairseq_ext.data.packing import best_fit_decreasing, pack
from fairseq_ext.data.tokenized import TokenizedDataset
from fairseq_ext.errors import UserInputError
from fairseq_ext.models.hf_auto import HFAutoCausalLM
from fairseq_ext.models.hf_loading import load_hf_model
from tests.helpers import MODEL_DIR


def _samples(lengths, seed=0):
    rng = random.Random(seed)
    input_ids = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    # a prompt of a third of each sample is not trained on, as instruction data has it
    labels = [[IGNORE_INDEX] * (len(ids) // 3) + ids[len(ids) // 3 :] for ids in input_ids]
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def test_best_fit_decreasing_fills_bins_within_capacity():
    lengths = [7, 3, 5, 2, 8, 1, 4, 6]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 36 tokens: 4 bins of 10 is the least possible


def test_packed_rows_keep_every_token_and_restart_positions():
    samples = _samples([5, 9, 3, 12, 7, 2, 16])
    packed = pack(samples, 16, "train")
    assert all(len(row) <= 16 for row in packed["input_ids"])
    assert sorted(t for row in packed["input_ids"] for t in row) == sorted(
        t for row in samples["input_ids"] for t in row
    )
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        assert len(ids) == len(labels) == len(positions)
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert starts[0] == 0 and all(labels[i] == IGNORE_INDEX for i in starts)  # no target crosses samples
    assert len(packed) < len(samples)


def test_packing_other_columns_is_refused():
    samples = _samples([4, 5]).add_column("group", [0, 1])
    with pytest.raises(UserInputError, match="PACK_SEQUENCES=0"):
        pack(samples, 16, "train")


@pytest.mark.parametrize("fused_loss", [True, False])
def test_packed_batch_gives_the_unpacked_loss_and_gradients(fused_loss):
    """The tiny Llama on 6 samples of different lengths, padded in one batch or packed into rows of 48
    tokens (block-diagonal attention from the position ids): the same summed loss, trained-token count
    and gradients, to float32 rounding."""
    model = HFAutoCausalLM(load_hf_model(AutoModelForCausalLM, str(MODEL_DIR)))
    model.lm_loss_logits = not fused_loss
    layout, criterion = get_layout("causal_lm"), CausalLMLoss(None)
    samples = _samples([9, 17, 30, 5, 22, 13], seed=1)

    def loss_and_grads(rows):
        dataset = TokenizedDataset(rows, layout, pad_id=0, shuffle=False)
        batch = dataset.collater([dataset[i] for i in range(len(dataset))])
        model.zero_grad()
        loss, ntokens, _ = criterion(model, batch)
        loss.backward()
        return loss.detach(), ntokens, {n: p.grad.clone() for n, p in model.named_parameters()}, batch

    loss, ntokens, grads, batch = loss_and_grads(samples)
    packed_loss, packed_ntokens, packed_grads, packed_batch = loss_and_grads(pack(samples, 48, "train"))
    assert packed_batch["net_input"]["input_ids"].numel() < batch["net_input"]["input_ids"].numel()
    assert "attention_mask" not in packed_batch["net_input"] and "position_ids" in packed_batch["net_input"]
    assert packed_ntokens == ntokens
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
