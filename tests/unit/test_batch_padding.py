"""Causal LM batches padded at the end (compiled tensor-parallel blocks, sequence parallel) train as they came."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fairseq_ext.criterions.lm_loss import CausalLMLoss
from fairseq_ext.cube.batch_padding import length_multiple, pad_batch
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


def test_length_multiple_follows_the_plan():
    tp2, tp1 = Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1), Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
    assert length_multiple(tp1, 64, compiled=True, sequence_parallel=True) == 1
    assert length_multiple(tp2, 64, compiled=False, sequence_parallel=False) == 1
    assert length_multiple(tp2, 64, compiled=True, sequence_parallel=False) == 64
    assert length_multiple(tp2, 63, compiled=False, sequence_parallel=True) == 2
    assert length_multiple(tp2, 63, compiled=True, sequence_parallel=True) == 126


def test_padded_batches_give_the_same_loss_and_gradients():
    config = AutoConfig.from_pretrained(str(MODEL_DIR))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for with_mask, packed in ((False, False), (True, False), (False, True)):
        sample = _batch(with_mask, packed)
        padded = pad_batch(sample, 8, pad_id=0)
        assert padded["net_input"]["input_ids"].shape == (2, 8) and padded["ntokens"] == sample["ntokens"]
        assert ("attention_mask" in padded["net_input"]) != packed  # packed rows keep their positions instead
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
            torch.testing.assert_close(padded_grad, grad, rtol=1e-5, atol=1e-7)
    assert pad_batch(sample, 7, pad_id=0) is sample and pad_batch({}, 8, pad_id=0) == {}
