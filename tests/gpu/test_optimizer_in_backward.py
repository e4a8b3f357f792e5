"""On a GPU: the optimizer step inside the backward (``optim/in_backward.py``) for bf16 weights, through the Triton
kernels of bf16-master and bf16-lean a layer at a time, against the step after the backward as fairseq drives both:
the same weights, masters and moments (bf16-lean: moments the same, weights one of the two bf16 neighbours),
the same logged norm, no wait for the device, and a peak lower by about the gradients' bytes.

Runs on the GPU machine (``python -m pytest -q tests/gpu``).
"""

import pytest
import torch
from omegaconf import OmegaConf

from fairseq_ext.optim.in_backward import layer_step_groups
from fairseq_ext.optim.lean_step import LeanAdamWStep, takes_fused_lean_step
from fairseq_ext.optim.master_step import MasterAdamWStep, takes_fused_master_step
from fairseq_ext.optim.torch_adamw import FairseqTorchAdamW

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

WIDTH, LAYERS, TOKENS = 4096, 6, 16  # 100M bf16 weights (201 MB of gradients), 34 MB each; small activations
LR = 1e-3


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _criterion(model, sample):
    loss = model(sample["x"]).float().pow(2).sum()
    return loss, sample["ntokens"], {}


def _train_step(sample, model, criterion, optimizer, update_num, ignore_grad=False):
    loss, sample_size, logging_output = criterion(model, sample)
    optimizer.backward(loss)
    return loss, sample_size, logging_output


def _run(precision: str, in_backward: bool, updates: int = 2):
    """``updates`` updates as fairseq's Trainer runs them (the last one after the first with the device's
    synchronizations made errors: the first fills the kernels' caches); returns the model, optimizer, last norm
    and what the last update allocated at its peak beyond what it started with (so that tensors of other runs
    still alive do not count)."""
    torch.manual_seed(0)
    model = _Stack().to("cuda", torch.bfloat16)
    cfg = OmegaConf.create(
        {"adam_betas": "(0.9, 0.95)", "adam_eps": 1e-8, "weight_decay": 0.1, "precision": precision, "lr": [LR]}
    )
    optimizer = FairseqTorchAdamW(cfg, list(model.parameters()))
    hooks = optimizer.step_in_backward(layer_step_groups(model.named_parameters())) if in_backward else None
    train_step = hooks.arming(_train_step) if hooks is not None else _train_step
    generator = torch.Generator(device="cuda").manual_seed(1)
    for update in range(updates):
        sample = {
            "x": torch.randn(TOKENS, WIDTH, device="cuda", generator=generator).to(torch.bfloat16),
            "ntokens": TOKENS,
        }
        last = update == updates - 1
        optimizer.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if last and update > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            if hooks is not None:
                hooks.start_update()
            train_step(sample=sample, model=model, criterion=_criterion, optimizer=optimizer, update_num=update)
            optimizer.multiply_grads(1 / float(TOKENS))
            norm = optimizer.clip_grad_norm(0.0)
            optimizer.skip_step_if_nonfinite(norm)
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return model, optimizer, norm, torch.cuda.max_memory_allocated() - start


@pytest.mark.parametrize("precision", ["bf16-master", "bf16-lean"])
def test_one_bf16_update_inside_the_backward_equals_the_step_after_it(precision):
    """bf16-master: the same masters and moments, so the same weights; bf16-lean: the same moments, each weight
    one of the two bf16 neighbours of the same float32 value (the rounding's noise differs). The same norm."""
    after, after_optimizer, after_norm, _ = _run(precision, in_backward=False, updates=1)
    inside, inside_optimizer, inside_norm, _ = _run(precision, in_backward=True, updates=1)
    fused, kernel = (
        (takes_fused_master_step, MasterAdamWStep)
        if precision == "bf16-master"
        else (takes_fused_lean_step, LeanAdamWStep)
    )
    assert kernel in inside_optimizer.optimizer._one_launch_steps  # the Triton kernel, a layer at a time
    for a, b in zip(after.parameters(), inside.parameters()):
        state_a, state_b = after_optimizer.optimizer.state[a], inside_optimizer.optimizer.state[b]
        assert b.grad is None  # freed once stepped
        b.grad = torch.zeros_like(b)
        assert fused(b, state_b)  # no weight took the unfused path
        b.grad = None
        assert state_a["step"].item() == state_b["step"].item() == 1
        keys = ("master", "exp_avg", "exp_avg_sq") if precision == "bf16-master" else ("exp_avg", "exp_avg_sq")
        for key in keys:
            torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-6, atol=0)
        ulp = a.detach().float().abs() * 2**-7  # bf16's spacing at the weight is at most this
        assert ((b.detach().float() - a.detach().float()).abs() <= ulp).all()
    torch.testing.assert_close(inside_norm, after_norm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("precision", ["bf16-master", "bf16-lean"])
def test_stepping_in_backward_waits_for_nothing_and_holds_no_gradients(precision):
    """The second update runs with the device's synchronizations made errors (the first fills the kernels'
    caches); its peak is lower by about the gradients' bytes (one layer's are in flight)."""
    after, _, after_norm, after_peak = _run(precision, in_backward=False)
    _, _, inside_norm, inside_peak = _run(precision, in_backward=True)
    torch.testing.assert_close(inside_norm, after_norm, rtol=1e-5 if precision == "bf16-master" else 1e-2, atol=0)
    grad_bytes = sum(p.numel() * p.element_size() for p in after.parameters())
    print(f"{precision}: peak {after_peak / 2**20:.1f} MiB after the backward, {inside_peak / 2**20:.1f} inside")
    assert after_peak - inside_peak >= 0.6 * grad_bytes, (after_peak, inside_peak, grad_bytes)
