"""On a GPU, bf16: packed rows on the document_varlen attention (torch's variable-length kernel) give each
sample the logits and gradients of unpacked rows on SDPA; compiled layers take batches of any number of
documents without compiling again for each.

Runs on the GPU machine (``python -m pytest -q tests/gpu``).
"""

import random

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.runtime.compile_layers import compile_layers
from fairseq_ext.data.layouts import IGNORE_INDEX, get_layout
from fairseq_ext.data.packing import pack
from fairseq_ext.data.tokenized import TokenizedDataset
from fairseq_ext.models import document_attention
from fairseq_ext.models.document_attention import ATTENTION_NAME
from fairseq_ext.models.hf_auto import HFAutoCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPE = dict(
    hidden_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,  # grouped-query attention: fewer key/value heads
    intermediate_size=1024,
    vocab_size=1000,
    max_position_embeddings=1024,
)


def _model(attention: str) -> HFAutoCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, attn_implementation=attention, use_cache=False, tie_word_embeddings=False)
    with torch.device("cuda"):
        hf_model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = HFAutoCausalLM(hf_model)
    model.lm_loss_logits = True
    return model


def _samples(lengths, seed):
    rng = random.Random(seed)
    input_ids = [[rng.randrange(3, SHAPE["vocab_size"]) for _ in range(n)] for n in lengths]
    labels = [[IGNORE_INDEX] * (len(ids) // 3) + ids[len(ids) // 3 :] for ids in input_ids]
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def _batch(rows):
    dataset = TokenizedDataset(rows, get_layout("causal_lm"), pad_id=0, shuffle=False)
    batch = dataset.collater([dataset[i] for i in range(len(dataset))])
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch["net_input"].items()}, dataset


def _per_sample_logits_and_grads(model, rows):
    net_input, dataset = _batch(rows)
    model.zero_grad()
    logits = model(**net_input)
    positions = net_input.get("position_ids")
    if positions is None:
        pieces = [logits[row, : len(dataset[row]["input_ids"])] for row in range(logits.size(0))]
    else:  # one padding-free row of documents
        starts = (positions[0] == 0).nonzero().flatten().tolist()
        pieces = [logits[0, a:b] for a, b in zip(starts, [*starts[1:], logits.size(1)])]
    pieces.sort(key=lambda t: (t.size(0), float(t[0, 0].detach())))
    # a loss that weighs every sample's tokens differently, so the gradients see each sample apart
    loss = sum((i + 1) * p.float().logsumexp(-1).mean() for i, p in enumerate(pieces))
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    return [p.detach().float() for p in pieces], grads


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_varlen_kernel_matches_unpacked_sdpa_in_bf16(monkeypatch):
    assert document_attention.varlen_attn is not None, "torch has no torch.nn.attention.varlen"
    calls = []
    kernel = document_attention.varlen_attn
    monkeypatch.setattr(document_attention, "varlen_attn", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    samples = _samples([37, 300, 129, 511, 64, 250, 8, 444, 190, 77], seed=0)
    reference, reference_grads = _per_sample_logits_and_grads(_model("sdpa"), samples)
    packed, packed_grads = _per_sample_logits_and_grads(_model(ATTENTION_NAME), pack(samples, 512, "train"))
    assert calls, "the packed forward did not run torch's varlen kernel"
    assert [t.size(0) for t in packed] == [t.size(0) for t in reference]
    for got, want in zip(packed, reference):
        assert _relative(got, want) < 2e-2
    for name, grad in reference_grads.items():
        assert _relative(packed_grads[name], grad) < 5e-2, name


def test_compiled_layers_take_any_number_of_documents_without_recompiling():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the graphs counted by earlier tests of the process
    model = _model(ATTENTION_NAME)
    compile_layers(model.hf_model)
    rng = random.Random(1)
    for step in range(6):
        lengths = [rng.randrange(16, 512) for _ in range(rng.randrange(6, 20))]
        net_input, _ = _batch(pack(_samples(lengths, seed=step), 512, "train"))
        model(**net_input).float().mean().backward()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 3, f"{frames} graphs compiled for 6 batches"  # the first shapes, then dynamic ones
