"""On a GPU: the chunked LM loss with bf16 inputs, whose head gradient is summed in float32 inside the matmul
(cuBLAS, ``out_dtype``), equals the float32 computation to bf16 rounding; the same call on the CPU agrees.

Runs on the GPU machine (``python -m pytest -q tests/gpu``).
"""

import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.cube.runtime.chunked_loss import linear_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_bf16_head_gradient_summed_in_float32_over_chunks_matches_float32():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1000, 256, generator=generator)
    weight = torch.randn(3000, 256, generator=generator) * 0.02
    target = torch.randint(0, 3000, (1000,), generator=generator)
    target[::17] = -100
    grads = {}
    for device in ("cpu", "cuda"):
        h = hidden.to(device, torch.bfloat16).requires_grad_()
        w = weight.to(device, torch.bfloat16).requires_grad_()
        loss = linear_cross_entropy(h, w, target.to(device), chunk_size=128)  # 8 chunks add into the sum
        loss.backward()
        grads[device] = (loss.detach().cpu(), h.grad.float().cpu(), w.grad.float().cpu())
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy(h @ w.T, target, ignore_index=-100, reduction="sum")
    expected.backward()
    for device, (loss, grad_h, grad_w) in grads.items():
        torch.testing.assert_close(loss, expected.detach(), rtol=2e-3, atol=0, msg=device)
        for grad, reference in ((grad_h, h.grad), (grad_w, w.grad)):
            assert (grad - reference).norm() / reference.norm() < 1e-2, device
