"""On a GPU: torch_adamw steps bf16 weights with bf16 moments (bf16-lean) by one Triton kernel
(``lean_step``): each step against a float32 reference step from the same bf16 states (moments rounded to
nearest, weights to one of the two bf16 neighbours of the reference, up with the probability of the
reference's position between them), against the unfused step it replaces, found_inf, and no wait for the
device.

Runs on the GPU machine (``python -m pytest -q tests/gpu``).
"""

import pytest
import torch

from fairseq_ext.optim import lean_step
from fairseq_ext.optim.adamw import MixedPrecisionAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BLOCK = lean_step.LeanAdamWStep.BLOCK
# a block and a bit, a LoRA-sized matrix, a norm's vector, one element, a 1.1B model's k_proj, two blocks
SHAPES = [(BLOCK + 3,), (16, 4096), (2048,), (1,), (256, 2048), (2 * BLOCK,)]
LR, BETAS, EPS, DECAY = 1e-3, (0.9, 0.95), 1e-8, 0.1


def _weights(seed: int, shapes=SHAPES):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, device="cuda", generator=generator).to(torch.bfloat16))
        for shape in shapes
    ]


def _gradients(weights, generator):
    for weight in weights:
        weight.grad = torch.randn(weight.shape, device="cuda", generator=generator).to(torch.bfloat16)


def _reference_step(weight, state, scale, lr):
    """AdamW in float32 from the bf16 weight, gradient and moments; the count is the one after the step."""
    step = state["step"].item()
    grad = weight.grad.float() * scale
    m = state["exp_avg"].float() + (1 - BETAS[0]) * (grad - state["exp_avg"].float())
    v = state["exp_avg_sq"].float() * BETAS[1] + (1 - BETAS[1]) * grad * grad
    denom = v.sqrt() / (1 - BETAS[1] ** step) ** 0.5 + EPS
    w = weight.detach().float() * (1 - lr * DECAY) - lr / (1 - BETAS[0] ** step) * m / denom
    return m, v, w


def _bf16_neighbours(value: torch.Tensor):
    """The bf16 values at or below and at or above each float32 ``value`` (by truncating its bits)."""
    down = (value.view(torch.int32) & -65536).view(torch.float32)
    up = ((value.view(torch.int32) & -65536) + 65536).view(torch.float32)
    exact = down == value
    low, high = torch.where(value >= 0, down, up), torch.where(value >= 0, up, down)
    return torch.where(exact, value, low), torch.where(exact, value, high), exact


def test_each_kernel_step_matches_a_float32_step_within_stochastic_rounding(monkeypatch):
    launches = []
    original = lean_step.LeanAdamWStep.__call__

    def counted(self, params, *args):
        launches.append(len(params))
        return original(self, params, *args)

    monkeypatch.setattr(lean_step.LeanAdamWStep, "__call__", counted)
    weights = _weights(0)
    optimizer = MixedPrecisionAdamW(weights, lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, lean_states=True)
    generator = torch.Generator(device="cuda").manual_seed(7)
    scale = torch.tensor(0.5, device="cuda")
    ups, fractions = [], []
    for update in range(3):
        _gradients(weights, generator)
        lr = LR / (update + 1)
        optimizer.param_groups[0]["lr"] = lr
        before = [(w.detach().clone(), {k: v.clone() for k, v in optimizer.state[w].items()}) for w in weights]
        optimizer.step(grad_scale=scale)
        for weight, (value, state) in zip(weights, before):
            if update == 0:
                continue  # the states are made by the first step: compare from the second on
            mirror = torch.nn.Parameter(value)
            mirror.grad = weight.grad
            m, v, w = _reference_step(mirror, dict(state, step=state["step"] + 1), 0.5, lr)
            after = optimizer.state[weight]
            assert after["exp_avg"].dtype == after["exp_avg_sq"].dtype == torch.bfloat16
            torch.testing.assert_close(after["exp_avg"].float(), m.bfloat16().float(), rtol=2**-7, atol=1e-6)
            torch.testing.assert_close(after["exp_avg_sq"].float(), v.bfloat16().float(), rtol=2**-7, atol=1e-8)
            low, high, exact = _bf16_neighbours(w)
            got = weight.detach().float()
            # the kernel's float32 arithmetic may differ from this one's in the last bits (moments near zero
            # too, where g - m cancels: hence the absolute tolerances): widen by 2**-20
            widest_low, _, _ = _bf16_neighbours(w - w.abs() * 2**-20)
            _, widest_high, _ = _bf16_neighbours(w + w.abs() * 2**-20)
            assert bool(((got >= widest_low) & (got <= widest_high)).all()), "a weight off its bf16 neighbours"
            inexact = ~exact
            ups.append((got == high)[inexact])
            fractions.append(((w - low) / (high - low))[inexact])
        assert all(s["step"].item() == update + 1 for s in optimizer.state.values())
    assert launches == [len(SHAPES)] * 3
    up, fraction = torch.cat(ups).float(), torch.cat(fractions)
    # rounded up as often as the reference's position between its neighbours says: unbiased on average
    assert abs(up.mean().item() - fraction.mean().item()) < 5e-3, (up.mean().item(), fraction.mean().item())
    for low, high in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
        band = (fraction >= low) & (fraction < high)
        assert abs(up[band].mean().item() - fraction[band].mean().item()) < 1e-2, (low, high)


def test_kernel_and_unfused_step_agree_in_distribution(monkeypatch):
    """From the same states, the kernel and the unfused step (the CPU's path) land on the same bf16 neighbours
    and round up equally often; their moments agree to bf16's rounding."""
    results = []
    for fused in (True, False):
        monkeypatch.setattr(lean_step, "triton_available", lambda fused=fused: fused)
        weights = _weights(3, shapes=[(4 * BLOCK,), (1000,)])
        optimizer = MixedPrecisionAdamW(weights, lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, lean_states=True)
        generator = torch.Generator(device="cuda").manual_seed(11)
        for _ in range(2):
            _gradients(weights, generator)
            optimizer.step(grad_scale=0.25)
        results.append((weights, optimizer))
    (fused_weights, fused), (plain_weights, plain) = results
    for a, b in zip(fused_weights, plain_weights):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused.state[a][key].float(), plain.state[b][key].float(), rtol=2**-5, atol=1e-6)
        assert fused.state[a]["step"].item() == plain.state[b]["step"].item() == 2
        difference = (a.detach().float() - b.detach().float()).abs()
        spacing = torch.maximum(a.detach().float().abs(), b.detach().float().abs()) * 2**-7
        # two roundings of each weight, plus updates from moments that rounded apart where g - m cancels
        assert bool((difference <= 3 * spacing + 2 * LR).all())
        assert (difference > 3 * spacing).float().mean().item() < 1e-3
        assert abs(a.detach().float().mean().item() - b.detach().float().mean().item()) < 2e-4


def test_rounding_noise_differs_between_tensors():
    """Two equal tensors with equal gradients round differently: the tensor is part of the noise's key (the
    seed changes each step: tests/unit/test_lean_step.py)."""
    weights = _weights(4, shapes=[(BLOCK,)])
    twin = torch.nn.Parameter(weights[0].detach().clone())
    optimizer = MixedPrecisionAdamW([weights[0], twin], lr=LR, betas=BETAS, eps=EPS, lean_states=True)
    grad = torch.randn(BLOCK, device="cuda").bfloat16()
    weights[0].grad, twin.grad = grad, grad.clone()
    optimizer.step()
    assert not torch.equal(weights[0].detach(), twin.detach())
    assert (weights[0].detach() != twin.detach()).float().mean().item() > 0.1


def test_found_inf_leaves_weights_moments_and_step_counts():
    weights = _weights(1)
    optimizer = MixedPrecisionAdamW(weights, lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, lean_states=True)
    _gradients(weights, torch.Generator(device="cuda").manual_seed(1))
    optimizer.step()
    before = [(w.detach().clone(), {k: v.clone() for k, v in optimizer.state[w].items()}) for w in weights]
    for weight in weights:
        weight.grad = torch.full_like(weight, float("nan"))
    optimizer.step(found_inf=torch.ones((), device="cuda"))
    for weight, (value, state) in zip(weights, before):
        assert torch.equal(weight.detach(), value)
        for key, tensor in state.items():
            assert torch.equal(optimizer.state[weight][key], tensor), key


@pytest.mark.parametrize("with_found_inf", [False, True])
def test_step_never_waits_for_the_device(with_found_inf):
    weights = _weights(2)
    optimizer = MixedPrecisionAdamW(weights, lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY, lean_states=True)
    _gradients(weights, torch.Generator(device="cuda").manual_seed(2))
    optimizer.step()  # builds the states and the kernel
    scale = torch.tensor(0.5, device="cuda")
    found_inf = torch.zeros((), device="cuda") if with_found_inf else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step(grad_scale=scale, found_inf=found_inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(optimizer.state[w]["step"].item() == 2 for w in weights)
