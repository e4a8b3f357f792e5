"""LORA_CONFIG parsing and LoRA application errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fairseq_ext.errors import UserInputError
from fairseq_ext.models.hf_loading import load_hf_model
from fairseq_ext.models.lora import apply_lora, parse_lora_config
from tests.helpers import MODEL_DIR


def test_key_value_and_json_forms_agree():
    as_pairs = parse_lora_config("r=16 lora_alpha=32 lora_dropout=0.05 target_modules=q_proj,v_proj use_rslora=true")
    as_json = parse_lora_config(
        '{"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "use_rslora": true}'
    )
    assert as_pairs == as_json
    assert parse_lora_config("") == {} and parse_lora_config("bias=lora_only") == {"bias": "lora_only"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("rank=16", r"unknown keys \['rank'\]; peft.LoraConfig accepts: .*lora_alpha"),
        ('{"r": 8, "alpha": 2}', r"unknown keys \['alpha'\]"),
        ("r16", r"entry 'r16' is not key=value"),
        ('{"r": 8,', r"LORA_CONFIG is not valid JSON"),
        ("task_type=SEQ_CLS", r"unknown keys \['task_type'\]"),
    ],
)
def test_bad_lora_config_is_a_clear_error(text, message):
    with pytest.raises(UserInputError, match=message):
        parse_lora_config(text)


def test_target_modules_matching_nothing_lists_the_linear_modules():
    model = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR))
    with pytest.raises(
        UserInputError,
        match=r"match no module of the model; its linear modules are: "
        r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ):
        apply_lora(model, "target_modules=query,value", "CAUSAL_LM")


def test_default_lora_trains_a_small_fraction():
    model = apply_lora(load_hf_model(AutoModelForCausalLM, str(MODEL_DIR)), "", "CAUSAL_LM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < 0.05 * total
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("in_model_dtype, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_adapters_of_a_bf16_model_stay_bf16_when_asked(in_model_dtype, expected):
    """PEFT's default makes adapters float32 (and their matmuls); bf16-master keeps them bf16, its
    optimizer holding their float32 master weights."""
    model = load_hf_model(AutoModelForCausalLM, MODEL_DIR, dtype="bfloat16")
    lora = apply_lora(model, "r=4 target_modules=q_proj,v_proj", "CAUSAL_LM", adapters_in_model_dtype=in_model_dtype)
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {expected}


def test_train_and_eval_switch_every_submodule_and_updates_are_counted():
    from fairseq_ext.models.hf_auto import HFAutoCausalLM

    model = HFAutoCausalLM(apply_lora(load_hf_model(AutoModelForCausalLM, MODEL_DIR), "r=4", "CAUSAL_LM").eval())
    for mode in (True, False, True, True, False, False, True):
        model.train(mode)
        assert all(m.training == mode for m in model.modules())
    model.set_num_updates(7)
    assert model.num_updates == 7
