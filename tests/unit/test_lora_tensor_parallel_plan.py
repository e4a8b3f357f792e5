"""How a LoRA-wrapped projection is split under tensor parallel: its adapters follow its base layer."""

import pytest
from peft import LoraConfig, get_peft_model
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.runtime.tensor_parallel import is_lora_layer, lora_plan
from fairseq_ext.errors import UserInputError


def lora_llama():
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=50,
        )
    )
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"])).get_base_model().model


def test_colwise_projection_splits_its_base_layer_and_b_and_keeps_a_whole():
    q_proj = lora_llama().layers[0].self_attn.q_proj
    assert is_lora_layer(q_proj)
    plan = lora_plan("layers.0.self_attn.q_proj", q_proj, "colwise")
    assert sorted(plan) == ["layers.0.self_attn.q_proj.base_layer", "layers.0.self_attn.q_proj.lora_B.default"]
    assert all(type(style) is ColwiseParallel for style in plan.values())


def test_rowwise_projection_splits_its_base_layer_and_a_and_keeps_b_whole():
    o_proj = lora_llama().layers[0].self_attn.o_proj
    plan = lora_plan("layers.0.self_attn.o_proj", o_proj, "rowwise")
    assert sorted(plan) == ["layers.0.self_attn.o_proj.base_layer", "layers.0.self_attn.o_proj.lora_A.default"]
    assert all(type(style) is RowwiseParallel for style in plan.values())


def test_lora_on_a_conv1d_projection_gets_one_clear_error():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16))
    c_attn = (
        get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
        .get_base_model()
        .transformer.h[0]
        .attn.c_attn
    )
    with pytest.raises(
        UserInputError,
        match="LoRA on h.0.attn.c_attn .*leave this module out of LoRA's target_modules or use PLAN_NGPUS=1",
    ):
        lora_plan("h.0.attn.c_attn", c_attn, "colwise_qkv")
