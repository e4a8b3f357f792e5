"""On a Hopper GPU: ``--sdpa-priority auto`` runs cuDNN attention, with FlashAttention's results."""

import pytest
import torch

from fairseq_ext.cube.runtime.attention import sdpa_priority

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                reason="needs a Hopper GPU")


def attention_and_grads(choice):
    torch.manual_seed(0)
    q = torch.randn(2, 32, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    with sdpa_priority(choice, torch.device("cuda")):
        backend = torch._fused_sdp_choice(q, *kv, is_causal=True, enable_gqa=True)
        out = torch.nn.functional.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
    out.float().square().sum().backward()
    return backend, out.float(), [t.grad.float() for t in (q, *kv)]


def test_auto_runs_cudnn_attention_with_the_results_of_flash_attention():
    from torch.nn.attention import SDPBackend

    backend, out, grads = attention_and_grads("auto")
    flash_backend, flash_out, flash_grads = attention_and_grads("torch")
    assert backend == int(SDPBackend.CUDNN_ATTENTION)
    assert flash_backend == int(SDPBackend.FLASH_ATTENTION)
    torch.testing.assert_close(out, flash_out, atol=2e-2, rtol=2e-2)
    for grad, flash_grad in zip(grads, flash_grads):
        torch.testing.assert_close(grad, flash_grad, atol=5e-2, rtol=5e-2)
