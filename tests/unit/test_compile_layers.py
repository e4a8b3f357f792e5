"""COMPILE=1's decoder layers: LoRA's A matrices that read the same input run as one matmul, with the
gradients of separate ones (inductor on the CPU)."""

import copy
from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.runtime import compile_layers as compile_module

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(base, dropout=0.0):
    torch.manual_seed(1)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide A's gradients
            torch.nn.init.normal_(param, std=0.02)
    return model


def loss_and_grads(model, tokens):
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fused_groups():
    """Sizes of the groups of projections the pass fused, compiled afresh (no cached graphs)."""
    sizes = []
    fuse = compile_module._fuse

    def counting(graph, nodes):
        sizes.append(len(nodes))
        return fuse(graph, nodes)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with (
        mock.patch.object(compile_module, "_fuse", counting),
        mock.patch.object(torch._inductor.config, "fx_graph_cache", False),
    ):
        yield sizes
    torch._dynamo.reset()


def test_lora_a_matrices_with_one_input_are_one_matmul_with_the_same_loss_and_gradients(fused_groups):
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
        )
    )
    tokens = torch.randint(3, 100, (2, 16))
    eager_loss, eager_grads = loss_and_grads(lora_llama(base), tokens)
    model = lora_llama(base)
    assert compile_module.compile_layers(model) == 3
    loss, grads = loss_and_grads(model, tokens)
    # the layers share compiled graphs: one for the first layer (its input needs no gradient), one for the
    # others; a recompile per layer would soon leave layers uncompiled (dynamo's recompile limit)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    # in each graph: q, k, v read the normed hidden states, gate and up the normed attention output; the
    # base weights and B matrices are not low rank, down and o read inputs of their own
    assert sorted(fused_groups) == [2, 2, 3, 3]
    assert torch.allclose(loss, eager_loss, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == 3 * 2 * len(TARGETS)
    for name, grad in grads.items():
        assert torch.allclose(grad, eager_grads[name], atol=1e-6, rtol=1e-4), name
