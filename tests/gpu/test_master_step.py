"""On a GPU: torch_adamw steps large bf16 weights with float32 masters by the compiled kernel (``master_step``),
with the numbers of the cast-step-copy path it replaces, and skips a step where found_inf is set.

Runs on the GPU machine (``python -m pytest -q tests/gpu``); on the CPU the optimizer keeps torch's fused kernel.
"""

import pytest
import torch

from fairseq_ext.optim import adamw, master_step
from fairseq_ext.optim.adamw import MixedPrecisionAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(1024, 512), (2048, 256), (64,), (16, 64)]  # two take the compiled update, two the chunked path


def _weights(seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, device="cuda", generator=generator).to(torch.bfloat16))
            for shape in SHAPES]


def _run(weights, updates, found_inf=None):
    optimizer = MixedPrecisionAdamW(weights, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator(device="cuda").manual_seed(7)
    for update in range(updates):
        for weight in weights:
            weight.grad = torch.randn(weight.shape, device="cuda", generator=generator).to(torch.bfloat16)
        optimizer.param_groups[0]["lr"] = 1e-3 / (update + 1)
        optimizer.step(grad_scale=torch.tensor(0.5, device="cuda"), found_inf=found_inf)
    return optimizer


def test_compiled_master_update_matches_the_chunked_path(monkeypatch):
    calls = []
    compiled = master_step.compiled_master_adamw()
    monkeypatch.setattr(adamw, "compiled_master_adamw", lambda: lambda *args: (calls.append(args[0].numel()),
                                                                              compiled(*args)))
    fused_weights = _weights(0)
    fused = _run(fused_weights, updates=3)
    assert sorted(set(calls)) == [1024 * 512, 2048 * 256] and len(calls) == 6

    monkeypatch.setattr(master_step, "FUSED_MASTER_MIN_ELEMENTS", 1 << 40)  # everything on the chunked path
    calls.clear()
    chunked_weights = _weights(0)
    chunked = _run(chunked_weights, updates=3)
    assert calls == []
    for mine, theirs in zip(fused_weights, chunked_weights):
        mine_state, their_state = fused.state[mine], chunked.state[theirs]
        torch.testing.assert_close(mine_state["master"], their_state["master"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine_state["exp_avg_sq"], their_state["exp_avg_sq"], rtol=1e-5, atol=0)
        assert mine_state["step"].item() == their_state["step"].item() == 3
        assert torch.equal(mine.detach(), mine_state["master"].to(torch.bfloat16))


def test_found_inf_leaves_compiled_weights_and_states():
    weights = _weights(1)
    optimizer = _run(weights, updates=1)
    before = [(w.detach().clone(), {k: v.clone() for k, v in optimizer.state[w].items()}) for w in weights]
    for weight in weights:
        weight.grad = torch.full_like(weight, float("nan"))
    optimizer.step(found_inf=torch.ones((), device="cuda"))
    for weight, (value, state) in zip(weights, before):
        assert torch.equal(weight.detach(), value)
        for key, tensor in state.items():
            assert torch.equal(optimizer.state[weight][key], tensor), key
