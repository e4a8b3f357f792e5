"""The compiled AdamW update of bf16 weights from float32 masters: torch's AdamW numbers, skips on found_inf,
one compiled graph for weights of any size."""

import torch

from fairseq_ext.optim import master_step
from fairseq_ext.optim.master_step import master_adamw_, takes_fused_master_step

HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _states(numel: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    master = torch.randn(numel, generator=generator)
    return dict(weight=master.to(torch.bfloat16), master=master, exp_avg=torch.zeros(numel),
                exp_avg_sq=torch.zeros(numel), step=torch.zeros(()))


def _step(update, states, grad, lr, scale, found_inf=0.0):
    update(states["weight"], grad, states["master"], states["exp_avg"], states["exp_avg_sq"], states["step"],
           torch.tensor(lr), torch.tensor(scale), torch.tensor(found_inf), **HYPER)


def test_matches_torch_adamw_on_the_master_with_scaled_gradients():
    states = _states(1000)
    reference = torch.nn.Parameter(states["master"].clone())
    optimizer = torch.optim.AdamW([reference], lr=1e-3, betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                  weight_decay=HYPER["weight_decay"])
    generator = torch.Generator().manual_seed(1)
    for lr, scale in ((1e-3, 0.5), (2e-3, 1.0), (5e-4, 0.25)):
        grad = torch.randn(1000, generator=generator).to(torch.bfloat16)
        _step(master_adamw_, states, grad, lr, scale)
        optimizer.param_groups[0]["lr"] = lr
        reference.grad = grad.float() * scale
        optimizer.step()
        torch.testing.assert_close(states["master"], reference.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(states["weight"], states["master"].to(torch.bfloat16))
        torch.testing.assert_close(states["exp_avg_sq"], optimizer.state[reference]["exp_avg_sq"], rtol=1e-6, atol=0)
    assert states["step"].item() == 3


def test_found_inf_changes_nothing():
    states = _states(64)
    _step(master_adamw_, states, torch.randn(64).to(torch.bfloat16), 1e-3, 1.0)
    before = {key: value.clone() for key, value in states.items()}
    _step(master_adamw_, states, torch.full((64,), float("nan"), dtype=torch.bfloat16), 1e-3, 1.0, found_inf=1.0)
    for key, value in states.items():
        assert torch.equal(value, before[key]), key


def test_compiled_update_is_one_graph_for_all_sizes_and_learning_rates(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(master_step, "_compiled", None)
    compiled = master_step.compiled_master_adamw()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for numel, lr in ((300, 1e-3), (4099, 2e-3), (300, 3e-4)):
        eager, fused = _states(numel, seed=numel), _states(numel, seed=numel)
        grad = torch.randn(numel).to(torch.bfloat16)
        _step(master_adamw_, eager, grad, lr, 0.7)
        _step(compiled, fused, grad, lr, 0.7)
        for key in eager:
            torch.testing.assert_close(fused[key], eager[key], rtol=1e-6, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_cpu_weights_keep_torchs_fused_cpu_kernel():
    weight = torch.nn.Parameter(torch.zeros(master_step.FUSED_MASTER_MIN_ELEMENTS, dtype=torch.bfloat16))
    weight.grad = torch.zeros_like(weight)
    state = dict(master=torch.zeros(weight.numel()), exp_avg=torch.zeros(weight.numel()),
                 exp_avg_sq=torch.zeros(weight.numel()))
    assert not takes_fused_master_step(weight, state)
