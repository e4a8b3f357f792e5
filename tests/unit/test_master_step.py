"""The one-launch AdamW step of bf16 weights with float32 masters: which weights take it, and which program
steps which block of which tensor. Its numbers are checked on the GPU (tests/gpu/test_master_step.py)."""

import torch

from fairseq_ext.optim import multi_tensor
from fairseq_ext.optim.master_step import BLOCK, MasterAdamWStep, takes_fused_master_step
from fairseq_ext.optim.multi_tensor import log2_beta


def test_blocks_cover_every_element_of_every_tensor_once():
    numels = (1, BLOCK, BLOCK + 1, 3 * BLOCK - 5)
    block_tensor, first_block, sizes = MasterAdamWStep()._layout(numels, torch.device("cpu"))
    assert block_tensor.tolist() == [0, 1, 2, 2, 3, 3, 3]
    assert first_block.tolist() == [0, 1, 2, 4] and sizes.tolist() == list(numels)
    covered = [[] for _ in numels]
    for program, tensor in enumerate(block_tensor.tolist()):
        start = (program - first_block[tensor].item()) * BLOCK
        covered[tensor] += [i for i in range(start, start + BLOCK) if i < numels[tensor]]
    assert covered == [list(range(n)) for n in numels]


def test_layouts_are_kept_for_a_few_lists_of_sizes():
    step, cpu = MasterAdamWStep(), torch.device("cpu")
    first = step._layout((10, 20), cpu)
    assert step._layout((10, 20), cpu) is first
    for n in range(1, multi_tensor.MAX_CACHED_LAYOUTS + 1):
        step._layout((n,), cpu)
    assert len(step._layouts) == multi_tensor.MAX_CACHED_LAYOUTS and (cpu, (10, 20)) not in step._layouts
    assert (cpu, (1,)) in step._layouts


def test_beta_zero_means_no_bias_correction():
    assert log2_beta(0.5) == -1.0 and 2 ** (3 * log2_beta(0.0)) == 0.0


def test_cpu_weights_keep_torchs_fused_cpu_kernel():
    weight = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    weight.grad = torch.zeros_like(weight)
    state = dict(
        master=torch.zeros(4096), exp_avg=torch.zeros(4096), exp_avg_sq=torch.zeros(4096), step=torch.zeros(())
    )
    assert not takes_fused_master_step(weight, state)


def test_optimizer_hands_eligible_weights_to_one_launch_per_device(monkeypatch):
    """The optimizer's side, on the CPU: eligible weights go to the kernel's caller (here a recorder) once per
    step and device, with their states and the group's settings; the others take torch's fused step."""
    from fairseq_ext.optim import adamw

    calls = []
    monkeypatch.setattr(adamw, "takes_fused_master_step", lambda weight, state: weight.numel() > 10)
    monkeypatch.setattr(
        MasterAdamWStep, "__call__", lambda self, params, states, *args: calls.append((params, states, args))
    )
    big, small = (torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16)) for n in (64, 4))
    optimizer = adamw.MixedPrecisionAdamW([big, small], lr=2e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for param in (big, small):
        param.grad = torch.ones_like(param)
    optimizer.step(grad_scale=0.5)
    ((params, states, (lr, scale, found_inf, betas, eps, decay)),) = calls
    assert params == [big] and states == [optimizer.state[big]] and "master" in states[0]
    assert (lr, betas, eps, decay) == (2e-3, (0.8, 0.9), 1e-6, 0.1)
    assert scale.item() == 0.5 and found_inf.item() == 0.0
    assert torch.equal(big.detach(), torch.ones(64, dtype=torch.bfloat16))  # left to the (recorded) kernel
    assert not torch.equal(small.detach(), torch.ones(4, dtype=torch.bfloat16))  # stepped by torch
