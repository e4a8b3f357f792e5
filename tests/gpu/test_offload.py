"""On a GPU: decoder layers whose activations wait in pinned host memory (runtime/offload.py) give the loss and
gradients of the same model without offloading, eager and compiled (COMPILE=1's inductor), and the peak memory of
a forward-backward drops by about what was offloaded, less the one layer the backward holds again.

Runs on the GPU machine (``python -m pytest -q tests/gpu``); without CUDA there is no device memory to free.
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.runtime.offload import apply_offload, offloaded_modules

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYERS = 6


@pytest.fixture(scope="module")
def model_and_tokens():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=LAYERS,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    # float32 and the eager attention: kernels without atomics (flash attention's backward sums dQ with them), so
    # the two runs may differ only by what offloading changes, which is nothing
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to("cuda")
    return model, torch.randint(3, 8192, (2, 2048), device="cuda")


def forward_backward(model, tokens):
    """Loss, gradients by parameter name, the memory the forward left allocated for the backward and the peak
    allocated, both above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - start
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, held, peak


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_offloading_keeps_results_and_frees_the_activations(model_and_tokens, compiled):
    base, tokens = model_and_tokens
    plain, offloading = copy.deepcopy(base), copy.deepcopy(base)
    assert apply_offload(offloading, ["LlamaDecoderLayer"]) == LAYERS
    if compiled:
        for layer in plain.model.layers:
            layer.compile()
        for wrapper in offloaded_modules(offloading):
            wrapper._checkpoint_wrapped_module.compile()
        forward_backward(plain, tokens)  # compile outside the measured passes
        forward_backward(offloading, tokens)
        for model in (plain, offloading):
            model.zero_grad(set_to_none=True)
    loss, grads, held, peak = forward_backward(plain, tokens)
    offloaded_loss, offloaded_grads, offloaded_held, offloaded_peak = forward_backward(offloading, tokens)
    torch.testing.assert_close(offloaded_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad, rtol=1e-5, atol=1e-8)
    per_layer = [w.last_stats["offloaded"] for w in offloaded_modules(offloading)]
    assert all(b > 0 for b in per_layer) and offloading.model.layers[0].last_stats["kept"] > 0
    # the layers' activations (all but the logits and what stays small) wait on the host after the forward; the
    # bytes copied count a storage once per view saved (eager attention saves several), so they bound nothing
    freed = held - offloaded_held
    assert offloaded_held <= 0.25 * held
    saved = peak - offloaded_peak
    print(
        f"compiled={compiled}: copied {sum(per_layer) / 2**20:.0f} MiB; held after the forward {held / 2**20:.0f} -> "
        f"{offloaded_held / 2**20:.0f} MiB; peak {peak / 2**20:.0f} -> {offloaded_peak / 2**20:.0f} MiB "
        f"(saved {saved / 2**20:.0f})"
    )
    # every layer's activations left the device but the one the backward holds again while it runs
    assert 0.7 * freed * (LAYERS - 1) / LAYERS <= saved <= 1.1 * freed
