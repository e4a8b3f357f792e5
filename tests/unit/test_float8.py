"""PRECISION=fp8 / fp8-lean on the CPU: which linear layers convert (torchao itself converts them on the GPU:
tests/gpu/test_float8.py), the refusals, and what the compile pass costs."""

import dataclasses
import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fairseq_ext.cube.cost import Workload, estimate, optimizer_step_bytes
from fairseq_ext.cube.hardware import Hardware
from fairseq_ext.cube.model_spec import RunSettings
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.runtime import float8
from fairseq_ext.cube.runtime.precision import check_precision, stored_as, weight_dtype
from fairseq_ext.errors import UserInputError
from tests.unit.test_search import LLAMA3_8B_SPEC, toy_profile

LLAMA3_8B = dict(hidden=4096, heads=32, kv_heads=8, intermediate=14336)
TINYLLAMA_1B = dict(hidden=2048, heads=32, kv_heads=4, intermediate=5632)


def converted(shape: dict) -> set:
    return {name for name, i, o in float8.llama_linears(**shape) if float8.converts(name, i, o)}


def test_the_narrow_projections_lora_adapters_and_odd_sizes_stay_bf16():
    everything_but_kv = {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert converted(LLAMA3_8B) == everything_but_kv  # k/v: 4096 -> 1024
    assert converted(TINYLLAMA_1B) == everything_but_kv  # k/v: 2048 -> 256
    assert float8.converts("mlp.up_proj.base_layer", 4096, 14336)  # LoRA's frozen base multiplies in float8
    assert not float8.converts("mlp.up_proj.lora_A.default", 4096, 16)
    assert not float8.converts("mlp.up_proj.lora_B.default", 16, 14336)
    assert not float8.converts("mlp.up_proj", 4096, 14344 + 4)  # not a multiple of 16
    assert float8.converts("self_attn.k_proj", 8192, 1024)  # wide enough in: Llama-3-70B's k/v convert


def test_a_min_width_leaves_the_square_projections_of_that_width_in_bf16():
    mlp = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert {n for n, i, o in float8.llama_linears(**TINYLLAMA_1B) if float8.converts(n, i, o, 2048)} == mlp
    wide = {n for n, i, o in float8.llama_linears(**LLAMA3_8B) if float8.converts(n, i, o, 2048)}
    assert wide == converted(LLAMA3_8B)  # 4096-wide q/o still convert


def test_the_compile_pass_costs_the_converted_layers_flops():
    per_layer = float8.float8_flops_per_token(**LLAMA3_8B)
    assert per_layer == 2 * (2 * 4096 * 4096 + 3 * 4096 * 14336)


def small_llama(intermediate: int = 1040, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)


class StandInTorchao(types.ModuleType):
    """``torchao.float8`` as the runtime calls it (torchao is an optional dependency the CPU machine does not
    install: its import logs failed CUDA extension loads in every process that loads transformers' models):
    records the linear layers the runtime's filter chooses, by their path inside each block."""

    def __init__(self):
        super().__init__("torchao.float8")
        self.chosen = []
        self.Float8LinearConfig = lambda: "tensorwise"

    def convert_to_float8_training(self, module, *, module_filter_fn, config):
        assert config == "tensorwise"
        for name, child in module.named_modules():
            if name and module_filter_fn(child, name):
                self.chosen.append(name)
        return module


def stand_in_torchao(monkeypatch) -> StandInTorchao:
    stand_in = StandInTorchao()
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", stand_in)
    return stand_in


def test_the_decoder_blocks_wide_linear_layers_convert_not_the_head_or_narrow_ones(monkeypatch):
    model = small_llama()
    torchao = stand_in_torchao(monkeypatch)
    assert float8.convert_blocks(model) == 4  # gate and up of 2 layers (64 -> 1040); down (1040 -> 64) is narrow
    assert torchao.chosen == ["mlp.gate_proj", "mlp.up_proj"] * 2  # paths inside each decoder layer


def test_the_min_width_reaches_the_conversion(monkeypatch):
    torchao = stand_in_torchao(monkeypatch)
    model = small_llama(intermediate=1056, hidden=1040)
    assert float8.convert_blocks(model, min_width=1040) == 6  # gate, up, down; not q/o (1040 -> 1040)
    assert torchao.chosen == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] * 2


def test_an_unknown_recipe_is_refused_by_one_check_before_torchao_is_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # torchao missing: the recipe is still checked first
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    for refuse in (
        lambda: float8.convert_blocks(small_llama(), recipe="blockwise"),
        lambda: float8.recipe_config("blockwise"),
    ):
        with pytest.raises(
            UserInputError,
            match=r"^unknown --float8-recipe 'blockwise'; choose one of tensorwise, tensorwise-fast-accum$",
        ) as refused:
            refuse()
        assert refused.traceback[-1].name == "check_recipe"
    float8.check_recipe("tensorwise-fast-accum")


def test_the_fast_accumulation_recipe_accumulates_every_float8_matmul_fast(monkeypatch):
    stand_in_torchao(monkeypatch)
    config = types.ModuleType("torchao.float8.config")
    config.Float8GemmConfig = lambda use_fast_accum=False: "fast" if use_fast_accum else "precise"
    monkeypatch.setitem(sys.modules, "torchao.float8.config", config)
    sys.modules["torchao.float8"].Float8LinearConfig = lambda **gemms: gemms or "tensorwise"
    assert float8.recipe_config("tensorwise") == "tensorwise"  # torchao's default: fast in the forward's only
    assert float8.recipe_config("tensorwise-fast-accum") == dict(
        gemm_config_grad_input="fast", gemm_config_grad_weight="fast"
    )


def test_lora_base_layers_convert_and_adapters_do_not(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small_llama(), LoraConfig(r=16, target_modules=["up_proj", "down_proj"]))
    torchao = stand_in_torchao(monkeypatch)  # after peft's own look for torchao
    assert float8.convert_blocks(model) == 4
    assert torchao.chosen == ["mlp.gate_proj", "mlp.up_proj.base_layer"] * 2


def test_refusals_say_what_to_use_instead(monkeypatch):
    with pytest.raises(UserInputError, match=r"this run is on the CPU: use PRECISION=bf16-master$"):
        float8.check_device(torch.device("cpu"))
    with pytest.raises(UserInputError, match=r"PRECISION=fp8-lean .* on the CPU: use PRECISION=bf16-lean$"):
        float8.check_device(torch.device("cpu"), "fp8-lean")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserInputError, match=r"NVIDIA A100-SXM4-80GB is 8\.0: use PRECISION=bf16-master$"):
        float8.check_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    float8.check_device(torch.device("cuda", 0))  # an H100 passes
    stand_in_torchao(monkeypatch)
    with pytest.raises(UserInputError, match=r"has none that qualify .* use PRECISION=bf16-master$"):
        float8.convert_blocks(small_llama(intermediate=128))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # torchao missing
    with pytest.raises(UserInputError, match=r"install it: pip install torchao==0\.18\.0$"):
        float8.convert_blocks(small_llama())


def test_fp8_keeps_bf16_master_weights_and_fp8_lean_bf16_lean_ones():
    assert stored_as("fp8") == "bf16-master" and stored_as("fp8-lean") == "bf16-lean"
    assert weight_dtype("fp8") == weight_dtype("fp8-lean") == "bfloat16"
    check_precision("fp8", optimizer="torch_adamw")
    with pytest.raises(UserInputError, match=r"PRECISION=fp8 keeps bf16 weights and needs --optimizer torch_adamw"):
        check_precision("fp8", optimizer="adam")
    with pytest.raises(UserInputError, match=r"drop --fp16/--bf16"):
        check_precision("fp8-lean", fp16=True)
    assert optimizer_step_bytes("fp8") == optimizer_step_bytes("bf16-master")
    assert optimizer_step_bytes("fp8-lean") == optimizer_step_bytes("bf16-lean")


def test_tensor_and_pipeline_parallel_are_refused_with_fp8_and_data_parallel_is_not():
    tp2 = Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1)
    reasons = LLAMA3_8B_SPEC.unsupported(tp2, RunSettings(precision="fp8", batch_size=2))
    assert any("PRECISION=fp8 with tensor or pipeline parallel (PLAN_NGPUS 2)" in r for r in reasons)
    dp2 = Plan(plan_ngpus=1, scaling_factor=2, tp=1, pp=1)
    assert LLAMA3_8B_SPEC.unsupported(dp2, RunSettings(precision="fp8", batch_size=2)) == []


def test_fp8_costs_bf16_masters_memory_and_its_converted_flops_at_the_float8_rate():
    layer_flops = 1.25 * float8.float8_flops_per_token(**LLAMA3_8B)  # a fifth of the layer's FLOPs stays bf16
    toy = toy_profile()
    layers = dataclasses.replace(toy.modules[1]["layers"], fwd_flops_per_token=layer_flops)
    shape = dict(hidden_size=4096, num_heads=32, num_kv_heads=8, intermediate_size=14336)
    bf16 = dataclasses.replace(toy, modules={1: dict(toy.modules[1], layers=layers)}, precision="bf16-master", **shape)
    hw, plan, work = Hardware(fp8_speedup=2.0), Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1), Workload(4, 1024)
    for base, fp8 in (("bf16-master", "fp8"), ("bf16-lean", "fp8-lean")):
        slow = estimate(dataclasses.replace(bf16, precision=base), plan, work, hw)
        fast = estimate(dataclasses.replace(bf16, precision=fp8), plan, work, hw)
        assert fast.peak_bytes == slow.peak_bytes and fast.parts["optimizer"] == slow.parts["optimizer"]
        layer_seconds = 2 * 3 * layer_flops * 4 * 1024 / (hw.device_flops * hw.efficiency)  # 2 layers, fwd + bwd
        saved = slow.parts["compute_and_tp"] - fast.parts["compute_and_tp"]
        assert saved == pytest.approx(layer_seconds * 0.8 * (1 - 1 / 2.0))
