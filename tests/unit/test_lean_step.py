"""The one-launch AdamW step of bf16 weights with bf16 moments (bf16-lean): which weights take it, what the
optimizer hands it, and the seeds its launches get. Its numbers are checked on the GPU
(tests/gpu/test_lean_step.py)."""

import torch

from fairseq_ext.optim import adamw, lean_step
from fairseq_ext.optim.lean_step import LeanAdamWStep, takes_fused_lean_step


def test_cpu_weights_keep_the_unfused_step():
    weight = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    weight.grad = torch.zeros_like(weight)
    state = dict(exp_avg=torch.zeros_like(weight), exp_avg_sq=torch.zeros_like(weight), step=torch.zeros(()))
    assert not takes_fused_lean_step(weight, state)


def test_optimizer_hands_eligible_lean_weights_to_one_launch(monkeypatch):
    """Eligible weights go to the kernel's caller (here a recorder) once per step and device, with their bf16
    moments, the group's settings, the scale and found_inf; the others take the unfused step."""
    calls = []
    monkeypatch.setattr(adamw, "takes_fused_lean_step", lambda weight, state: weight.numel() > 10)
    monkeypatch.setattr(
        LeanAdamWStep, "__call__", lambda self, params, states, *args: calls.append((params, states, args))
    )
    big, small = (torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16)) for n in (64, 4))
    optimizer = adamw.MixedPrecisionAdamW(
        [big, small], lr=2e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, lean_states=True
    )
    for param in (big, small):
        param.grad = torch.ones_like(param)
    optimizer.step(grad_scale=0.5, found_inf=torch.zeros(()))
    ((params, states, (lr, scale, found_inf, betas, eps, decay)),) = calls
    assert params == [big] and states == [optimizer.state[big]]
    assert states[0]["exp_avg"].dtype == torch.bfloat16 and "master" not in states[0]
    assert (lr, betas, eps, decay) == (2e-3, (0.8, 0.9), 1e-6, 0.1)
    assert scale.item() == 0.5 and found_inf.item() == 0.0
    assert torch.equal(big.detach(), torch.ones(64, dtype=torch.bfloat16))  # left to the (recorded) kernel
    assert not torch.equal(small.detach(), torch.ones(4, dtype=torch.bfloat16))  # stepped unfused
    assert optimizer.state[small]["step"].item() == 1.0


def test_each_launch_gets_a_new_seed_from_the_host(monkeypatch):
    """The rounding's noise differs from step to step: each launch takes the next seed of the step's own
    host generator (no read from the device), the same sequence for the same starting seed."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(lean_step, "_kernel", Recorder())
    step, same = LeanAdamWStep(), LeanAdamWStep()
    layout = step._layout((5, LeanAdamWStep.BLOCK + 1), torch.device("cpu"))
    for caller in (step, step, same):
        caller._launch(3, None, layout, None, None, None, (0.9, 0.95), 1e-8, 0.1)
    seeds = [args[7] for _, args, _ in launches]
    assert seeds[0] != seeds[1] and seeds[2] == seeds[0] and all(0 <= s < 2**31 for s in seeds)
    assert [grid for grid, _, _ in launches] == [(3,)] * 3
    assert launches[0][2]["SEGMENT"] * lean_step.SEGMENTS == LeanAdamWStep.BLOCK
    assert layout[0].tolist() == [0, 1, 1]  # blocks of 8 segments: one for 5 elements, two for BLOCK + 1
