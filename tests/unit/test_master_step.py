"""The one-launch AdamW step of bf16 weights with float32 masters: which weights take it, and which program
steps which block of which tensor. Its numbers are checked on the GPU (tests/gpu/test_master_step.py)."""

import torch

from fairseq_ext.optim.master_step import BLOCK, MasterAdamWStep, _log2, takes_fused_master_step


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
    step = MasterAdamWStep()
    first = step._layout((10, 20), torch.device("cpu"))
    assert step._layout((10, 20), torch.device("cpu")) is first
    for n in range(1, 6):
        step._layout((n,), torch.device("cpu"))
    assert len(step._layouts) == 4 and (10, 20) not in step._layouts


def test_beta_zero_means_no_bias_correction():
    assert _log2(0.5) == -1.0 and 2 ** (3 * _log2(0.0)) == 0.0


def test_cpu_weights_keep_torchs_fused_cpu_kernel():
    weight = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
    weight.grad = torch.zeros_like(weight)
    state = dict(master=torch.zeros(4096), exp_avg=torch.zeros(4096), exp_avg_sq=torch.zeros(4096),
                 step=torch.zeros(()))
    assert not takes_fused_master_step(weight, state)

