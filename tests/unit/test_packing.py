"""Sequence packing: rows within SEQUENCE_LENGTH that keep every token, and the unpacked batch's loss."""

import random

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, masking_utils

from fairseq_ext.criterions.lm_loss import CausalLMLoss
from fairseq_ext.cube.micro_batches import split_batch
from fairseq_ext.cube.runtime.recompute import apply_recompute
from fairseq_ext.data.layouts import IGNORE_INDEX, document_lengths, get_layout
from fairseq_ext.data.packing import best_fit_decreasing, pack
from fairseq_ext.data.tokenized import TokenizedDataset
from fairseq_ext.errors import UserInputError
from fairseq_ext.models import document_attention
from fairseq_ext.models.document_attention import ATTENTION_NAME, document_kwargs
from fairseq_ext.models.hf_auto import HFAutoCausalLM
from fairseq_ext.models.hf_loading import load_hf_model
from fairseq_ext.models.lora import apply_lora
from fairseq_ext.tasks.hf_finetune import check_token_budget
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


@pytest.mark.parametrize(
    "fused_loss, attention", [(True, "sdpa"), (False, "sdpa"), (True, ATTENTION_NAME), (False, ATTENTION_NAME)]
)
def test_packed_batch_gives_the_unpacked_loss_and_gradients(fused_loss, attention, monkeypatch):
    """The tiny Llama on 6 samples of different lengths, padded in one batch or packed into rows of 48
    tokens (sdpa: block-diagonal attention from the position ids; document_varlen: attention per document,
    no mask): the same summed loss, trained-token count and gradients, to float32 rounding."""
    if attention == ATTENTION_NAME:  # the packed rows never get a mask: neither a 4D one nor a packing check
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", _no_mask_expected)
        monkeypatch.setattr(masking_utils, "sdpa_mask", _no_mask_expected)
    model = HFAutoCausalLM(load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), attn_implementation=attention))
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


def _no_mask_expected(*args, **kwargs):
    raise AssertionError("a mask was built for document_varlen attention")


def _sample_logits(model, rows):
    """Each sample's logits (its tokens in order), found by the sample's first tokens in the batch's rows."""
    dataset = TokenizedDataset(rows, get_layout("causal_lm"), pad_id=0, shuffle=False)
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(**batch["net_input"])
    positions = batch["net_input"].get("position_ids")
    if positions is None:
        per_sample = [logits[row, : len(rows[row]["input_ids"])] for row in range(logits.size(0))]
    else:  # one padding-free row: the documents end to end
        assert logits.size(0) == 1 and logits.size(1) == sum(len(ids) for ids in rows["input_ids"])
        starts = (positions[0] == 0).nonzero().flatten().tolist()
        per_sample = [logits[0, a:b] for a, b in zip(starts, [*starts[1:], logits.size(1)])]
    return sorted(per_sample, key=lambda t: (t.size(0), float(t[0, 0])))


def test_document_attention_gives_each_sample_its_own_logits():
    """Per sample, packed rows on document_varlen give the logits of the sample alone (float32, 1e-5
    relative), for rows whose last document ends in padding and rows of several documents."""
    model = HFAutoCausalLM(load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), attn_implementation=ATTENTION_NAME))
    model.lm_loss_logits = True
    samples = _samples([9, 17, 30, 5, 22, 13, 40, 3], seed=2)
    alone = [_sample_logits(model, samples.select([i]))[0] for i in range(len(samples))]
    packed = _sample_logits(model, pack(samples, 48, "train"))
    alone = sorted(alone, key=lambda t: (t.size(0), float(t[0, 0])))
    assert [t.size(0) for t in packed] == [t.size(0) for t in alone]
    for got, want in zip(packed, alone):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_rows_become_one_padding_free_row_of_documents():
    """Rows of 3+2+1 and 4 tokens (3 pads): one row of 10 tokens, documents [3, 2, 1, 4], offsets for the
    kernel, targets that never cross a document."""
    samples = [
        {
            "id": torch.tensor(0),
            "input_ids": torch.tensor([5, 6, 7, 8, 9, 10]),
            "labels": torch.tensor([-100, 6, 7, -100, 9, -100]),
            "position_ids": torch.tensor([0, 1, 2, 0, 1, 0]),
        },
        {
            "id": torch.tensor(1),
            "input_ids": torch.tensor([11, 12, 13, 14]),
            "labels": torch.tensor([-100, 12, 13, 14]),
            "position_ids": torch.tensor([0, 1, 2, 3]),
        },
    ]
    batch = get_layout("causal_lm").collate(samples, pad_id=0)
    net_input = batch["net_input"]
    assert net_input["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert net_input["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]]
    assert net_input["document_lengths"].tolist() == [[3, 2, 1, 4]] and net_input["max_document_length"] == 4
    assert "attention_mask" not in net_input and batch["nsentences"] == 2
    assert batch["target"].tolist() == [[6, 7, -100, 9, -100, -100, 12, 13, 14, -100]] and batch["ntokens"] == 6
    kwargs = document_kwargs(net_input["document_lengths"], net_input["max_document_length"])
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["max_length_q"] == 4
    assert document_lengths(net_input["position_ids"]).tolist() == [[3, 2, 1, 4]]
    first, second = split_batch(batch, 2)  # micro-batches: whole documents, about half the tokens each
    assert first["net_input"]["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert second["net_input"]["document_lengths"].tolist() == [[1, 4]]
    assert second["net_input"]["max_document_length"] == 4 and second["target"].tolist() == [[-100, 12, 13, 14, -100]]
    assert first["ntokens"] == second["ntokens"] == 3


def test_a_token_budget_below_the_longest_sample_is_one_clear_error():
    """MAX_TOKENS (--max-tokens) must hold the longest sample after truncation: the task says so, with the
    numbers, before fairseq's batching fails on that sample."""
    dataset = TokenizedDataset(_samples([9, 40, 17]), get_layout("causal_lm"), pad_id=0, shuffle=False)
    with pytest.raises(
        UserInputError,
        match=r"MAX_TOKENS 32 is smaller than the longest sample after truncation "
        r"to SEQUENCE_LENGTH 64 \(40 tokens\); set MAX_TOKENS to at least 40",
    ):
        check_token_budget(dataset, 32, 64)
    check_token_budget(dataset, 40, 64)
    check_token_budget(dataset, None, 64)


def test_flex_attention_document_mask_matches_attention_per_document():
    """The path for GPUs without torch's varlen kernel (FlexAttention, a document BlockMask) computes what
    the CPU's per-document SDPA does (forward only: FlexAttention has no backward on the CPU)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(37, 4, 8, generator=generator)  # (tokens, heads, head_dim); grouped-query: 2 key/value heads
    k, v = (torch.randn(37, 2, 8, generator=generator) for _ in range(2))
    offsets = torch.tensor([0, 5, 5, 21, 30, 37], dtype=torch.int32)  # a zero-length document too
    with torch.no_grad():
        flex = document_attention._flex(q, k, v, offsets, 0.3)
        per_document = document_attention._per_document(q, k, v, offsets, 0.3)
    torch.testing.assert_close(flex, per_document, rtol=1e-5, atol=1e-5)


def test_packed_rows_with_lora_and_recompute_train_as_unpacked_rows():
    """document_varlen under LoRA adapters and recomputed decoder layers: the packed batch's loss and adapter
    gradients are the unpacked batch's (float32, 1e-5 relative)."""
    hf_model = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), attn_implementation=ATTENTION_NAME)
    assert apply_recompute(hf_model, ["LlamaDecoderLayer"]) > 0
    model = HFAutoCausalLM(apply_lora(hf_model, "r=4 lora_alpha=8", "CAUSAL_LM"))
    layout, criterion = get_layout("causal_lm"), CausalLMLoss(None)
    samples = _samples([9, 17, 30, 5, 22, 13], seed=3)

    def loss_and_grads(rows):
        dataset = TokenizedDataset(rows, layout, pad_id=0, shuffle=False)
        model.zero_grad()
        loss, _, _ = criterion(model, dataset.collater([dataset[i] for i in range(len(dataset))]))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads(samples)
    packed_loss, packed_grads = loss_and_grads(pack(samples, 48, "train"))
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    assert any(g.norm() > 0 for g in grads.values())  # B starts at zero: the B matrices get gradients
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_generation_of_a_document_varlen_model_uses_the_masks():
    """Generation (left padding, a key/value cache) needs Hugging Face's masks: a model trained on
    document_varlen generates what the same weights on sdpa generate, and is on document_varlen after."""
    from fairseq_ext.evaluation.generation import generate_answers
    from fairseq_ext.models.hf_loading import load_tokenizer

    tokenizer = load_tokenizer(str(MODEL_DIR))
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 40, 41], [3, 4]]  # of different lengths: left padding
    answers = {}
    for attention in ("sdpa", ATTENTION_NAME):
        model = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), attn_implementation=attention)
        answers[attention] = generate_answers(model, tokenizer, prompts, max_new_tokens=6)
        assert model.config._attn_implementation == attention
    assert answers[ATTENTION_NAME] == answers["sdpa"] and any(answers["sdpa"])


def test_padding_free_batches_give_each_sample_its_padded_loss_and_gradients():
    """Unpacked samples of different lengths in one batch, padded (causal SDPA, pad tokens last) or padding-free
    (``padding_free``: one row of the samples end to end, document_varlen attention, per document on the CPU):
    each sample's summed loss and the gradients of each sample's loss alone are the same (1e-5 relative), and
    the padding-free batch computes no padding."""
    samples = _samples([9, 17, 30, 5, 22, 13], seed=3)
    layout = get_layout("causal_lm")

    def per_sample(attention, padding_free):
        model = HFAutoCausalLM(load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), attn_implementation=attention))
        model.lm_loss_logits = True
        dataset = TokenizedDataset(samples, layout, pad_id=0, shuffle=False, padding_free=padding_free)
        batch = dataset.collater([dataset[i] for i in range(len(dataset))])
        logits = model(**batch["net_input"])
        token_loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(batch["target"].shape)
        if padding_free:
            ends = batch["net_input"]["document_lengths"][0].cumsum(0).tolist()
            spans = [(0, 0, ends[0]), *((0, a, b) for a, b in zip(ends, ends[1:]))]
        else:
            spans = [(row, 0, len(samples[row]["input_ids"])) for row in range(len(samples))]
        results = []
        for row, start, end in spans:
            loss = token_loss[row, start:end].sum()
            grads = torch.autograd.grad(loss, [p for p in model.parameters()], retain_graph=True)
            results.append((loss.detach(), grads))
        return results, batch

    padded, padded_batch = per_sample("sdpa", padding_free=False)
    free, free_batch = per_sample(ATTENTION_NAME, padding_free=True)
    assert free_batch["net_input"]["input_ids"].shape == (1, sum(len(ids) for ids in samples["input_ids"]))
    assert "attention_mask" not in free_batch["net_input"] and "attention_mask" not in padded_batch["net_input"]
    assert free_batch["ntokens"] == padded_batch["ntokens"]
    for (want_loss, want_grads), (loss, grads) in zip(padded, free):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
        for want, got in zip(want_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
