"""Causal LM batches padded at the end (compiled layers, compiled tensor-parallel blocks, sequence parallel) train as
they came, and compiled layers compile twice however many lengths the batches have."""

import copy
from unittest import mock

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fairseq_ext.criterions.lm_loss import CausalLMLoss
from fairseq_ext.cube.batch_padding import LENGTH_BUCKET, LengthRule, pad_batch
from fairseq_ext.cube.plan import Plan
from fairseq_ext.data.layouts import IGNORE_INDEX
from tests.helpers import MODEL_DIR


def _batch(with_mask: bool, packed: bool = False):
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 7))
    target = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    target[1, 5:] = IGNORE_INDEX
    net_input = {"input_ids": ids}
    if with_mask:
        net_input["attention_mask"] = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    if packed:
        net_input["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 0, 0]])
    return {
        "id": torch.arange(2),
        "nsentences": 2,
        "ntokens": int((target != IGNORE_INDEX).sum()),
        "target": target,
        "net_input": net_input,
    }


def test_the_length_rule_follows_the_plan():
    tp2, tp1 = Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1), Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
    assert LengthRule.of(tp1, 64, compiled=False, sequence_parallel=True)(37) == 37
    assert LengthRule.of(tp2, 64, compiled=False, sequence_parallel=False)(37) == 37
    assert LengthRule.of(tp2, 64, compiled=True, sequence_parallel=False)(37) == 64
    assert LengthRule.of(tp2, 63, compiled=False, sequence_parallel=True)(37) == 38
    assert LengthRule.of(tp2, 63, compiled=True, sequence_parallel=True)(37) == 126
    # compiled layers of one GPU: lengths rounded up to LENGTH_BUCKET, at most SEQUENCE_LENGTH; packed rows as
    # they are; other heads than causal LM's as they are
    compiled = LengthRule.of(tp1, 1000, compiled=True, sequence_parallel=False)
    assert LENGTH_BUCKET == 64
    assert [compiled(n) for n in (1, 64, 65, 960, 961, 1000)] == [64, 64, 128, 960, 1000, 1000]
    assert compiled(37, packed=True) == 37
    assert LengthRule.of(tp1, 1000, compiled=True, sequence_parallel=False, causal_lm=False)(37) == 37


def test_padded_batches_give_the_same_loss_and_gradients():
    config = AutoConfig.from_pretrained(str(MODEL_DIR))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for with_mask, packed in ((False, False), (True, False), (False, True)):
        sample = _batch(with_mask, packed)
        padded = pad_batch(sample, LengthRule(tp=2, sequence_length=8, compiled=True), pad_id=0)
        assert padded["net_input"]["input_ids"].shape == (2, 8) and padded["ntokens"] == sample["ntokens"]
        assert ("attention_mask" in padded["net_input"]) == with_mask
        results = []
        for batch in (sample, padded):
            model.zero_grad()
            logits = model(**batch["net_input"]).logits
            loss = CausalLMLoss.token_loss(logits, batch["target"])
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (loss, grads), (padded_loss, padded_grads) = results
        torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=0)
        for grad, padded_grad in zip(grads, padded_grads):
            # longer rows change the matmuls' summation order: float32 rounding of the tensor's own scale
            torch.testing.assert_close(padded_grad, grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
    unchanged = LengthRule(tp=2, sequence_length=7, compiled=True)
    assert pad_batch(sample, unchanged, pad_id=0) is sample and pad_batch({}, unchanged, pad_id=0) == {}


def test_compiled_layers_compile_twice_for_batches_of_many_lengths_and_train_as_padded_eager_batches():
    """COMPILE=1 on one process: batches of five lengths, collated without a mask and padded to LENGTH_BUCKET,
    compile the layers for the first length and once more with the length symbolic, and give the losses and
    gradients of the eager model over the same rows padded to their longest with Hugging Face's padding mask."""
    from fairseq_ext.cube.runtime.compile_layers import compile_layers
    from fairseq_ext.data.layouts import get_layout

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    eager = LlamaForCausalLM(config)
    compiled = copy.deepcopy(eager)
    compile_layers(compiled)
    rule = LengthRule(sequence_length=256, compiled=True)
    layout = get_layout("causal_lm")
    graphs = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with mock.patch.object(torch._inductor.config, "fx_graph_cache", False):
        for lengths in ((30, 12), (70, 65), (100, 3), (190, 64), (50, 49)):
            rows = []
            for i, n in enumerate(lengths):
                ids = torch.randint(3, 100, (n,))
                rows.append({"id": i, "input_ids": ids, "labels": torch.where(torch.rand(n) < 0.3, IGNORE_INDEX, ids)})
            batch = layout.collate(rows, pad_id=0)
            assert "attention_mask" not in batch["net_input"]
            padded = pad_batch(batch, rule, pad_id=0)
            assert padded["net_input"]["input_ids"].size(1) == -(-max(lengths) // LENGTH_BUCKET) * LENGTH_BUCKET
            mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
            results = []
            for model, net_input, target in (
                (eager, {**batch["net_input"], "attention_mask": mask}, batch["target"]),
                (compiled, padded["net_input"], padded["target"]),
            ):
                model.zero_grad()
                loss = CausalLMLoss.token_loss(model(**net_input, use_cache=False).logits, target)
                loss.backward()
                results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            (want, want_grads), (got, got_grads) = results
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for g, w in zip(got_grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    # the first length's graphs, then those of a symbolic length (the second); none after
    assert graphs[1] > graphs[0] > 0 and graphs[1:] == [graphs[1]] * 4, graphs
