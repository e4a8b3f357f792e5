"""Every plan the search may pick runs: a grid of model families x run settings x GPU counts.

For each cell the search costs the plans of a scale unit with the run's settings (the compile pass's view,
``CompileSettings.run_settings``); then every plan it lets through is handed to the runtime's own checks
(``plan_checks.apply_plan`` with a fairseq-like config of the same settings), on a model built on the meta
device, in one process under torch's fake process group (the mesh and DTensor sharding are real, the
collectives are not run). A distinct split (tp, pp, virtual stages, recompute, LoRA) is built once; for the
others the runtime's reading of its config must find nothing to refuse. Plans the search refuses are
refused by the runtime too, with the same first reason.

The compile pass profiles Llama-style decoders only; the grid gives the search a stand-in profile of the
family's sizes and classes (which plans may run does not depend on costs), and checks every plan the
search lets through, not only the fastest.
"""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from fairseq_ext.cube import custom
from fairseq_ext.cube.compile import CompileSettings
from fairseq_ext.cube.cost import Hardware, Workload
from fairseq_ext.cube.model_spec import RunSettings, spec_of
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.plan_checks import apply_plan, run_settings
from fairseq_ext.cube.profile_types import Activations, ModelProfile, ModuleProfile
from fairseq_ext.cube.search import search
from fairseq_ext.errors import UserInputError

BATCH_SIZE = 8
GPU_COUNTS = (1, 2, 4)
SETTINGS = {  # name -> (CompileSettings fields, ZeRO)
    "fp32": ({}, False),
    "bf16-master": (dict(precision="bf16-master"), False),
    "fp16": (dict(precision="fp16"), False),
    "compile": (dict(compiled=True), False),
    "lora": (dict(lora_config=""), False),
    "packing": (dict(packing=True), False),
    "sequence-parallel+compile": (dict(sequence_parallel=True, compiled=True), False),
    "zero": ({}, True),
    "bf16+lora+zero": (dict(precision="bf16", lora_config=""), True),
}


def _llama(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=4,
        vocab_size=128,
        tie_word_embeddings=False,
        **extra,
    )


def _qwen2_tied():
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=4,
        vocab_size=128,
        tie_word_embeddings=True,
    )


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_head=4, n_layer=4, vocab_size=128, n_positions=64)


def _bert():
    from transformers import BertConfig

    return BertConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=64,
    )


def _t5():
    from transformers import T5Config

    return T5Config(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=128)


def _custom():
    config = _llama()
    config.base_model_tp_plan = None  # no rules of its own: the registered classes carry them
    return config


# family -> (config, AutoModel class name, head, (layer, attention, MLP classes), LoRA targets)
FAMILIES = {
    "llama": (
        _llama,
        "AutoModelForCausalLM",
        "causal_lm",
        ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP"),
        ["q_proj", "v_proj"],
    ),
    "qwen2-tied": (
        _qwen2_tied,
        "AutoModelForCausalLM",
        "causal_lm",
        ("Qwen2DecoderLayer", "Qwen2Attention", "Qwen2MLP"),
        ["q_proj", "v_proj"],
    ),
    "gpt2": (_gpt2, "AutoModelForCausalLM", "causal_lm", ("GPT2Block", "GPT2Attention", "GPT2MLP"), ["c_attn"]),
    "bert": (
        _bert,
        "AutoModelForSequenceClassification",
        "seq_cls",
        ("BertLayer", "BertAttention", "BertOutput"),
        ["query", "value"],
    ),
    "t5": (_t5, "AutoModelForSeq2SeqLM", "seq2seq_lm", ("T5Block", "T5Attention", "T5LayerFF"), ["q", "v"]),
    "custom": (
        _custom,
        "AutoModelForCausalLM",
        "causal_lm",
        ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP"),
        ["q_proj", "v_proj"],
    ),
}
CUSTOM_RULES = {
    "LlamaAttention": {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"},
    "LlamaMLP": {},
}  # attention split by its registered rules, the MLP kept whole


@pytest.fixture
def registered(monkeypatch):
    for name, rules in CUSTOM_RULES.items():
        monkeypatch.setitem(custom.CUSTOM_MODULES, name, rules)


def stand_in_profile(spec, classes, precision: str, tp_degrees) -> ModelProfile:
    """A profile with the family's layer count and classes; the costs are the same for every family."""

    def module(name):
        recompute = {cls: (Activations(per_token=10.0, transient_per_token=90.0), 1e3) for cls in classes}
        return ModuleProfile(
            name=name,
            class_name=classes[0],
            param_numel=4096,
            sharded_numel=2048,
            activations=Activations(per_token=100.0),
            recompute=recompute,
            fwd_flops_per_token=1e4,
        )

    return ModelProfile(
        model_type=spec.model_type,
        num_layers=spec.num_layers,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=128,
        seq_len=16,
        precision=precision,
        layer_class=classes[0],
        attention_class=classes[1],
        mlp_class=classes[2],
        tp_degrees=tuple(tp_degrees),
        vocab_parallel={tp: spec.vocab_parallel(tp, 1) for tp in tp_degrees},
        modules={tp: {name: module(name) for name in ("embed", "layers", "norm", "head")} for tp in tp_degrees},
        shared={tp: Activations(per_token=0.0) for tp in tp_degrees},
    )


class FairseqModel(torch.nn.Module):
    """What the runtime reads of an hf_auto_* model."""

    def __init__(self, hf_model, head: str, lora: bool):
        super().__init__()
        self.hf_model, self.layout = hf_model, head
        self.supports_pipeline = head == "causal_lm"
        self.saves_trainable_only = lora


def build(family: str, lora: bool) -> FairseqModel:
    import transformers
    from peft import LoraConfig, get_peft_model

    make_config, auto, head, _, targets = FAMILIES[family]
    with torch.device("meta"):
        hf_model = getattr(transformers, auto).from_config(make_config())
        if lora:
            hf_model = get_peft_model(hf_model, LoraConfig(r=4, target_modules=targets))
    return FairseqModel(hf_model, head, lora)


def criterion_for(head: str):
    from fairseq_ext.criterions.lm_loss import CausalLMLoss

    return SimpleNamespace(supports_pipeline=head == "causal_lm", token_loss=CausalLMLoss.token_loss)


def fairseq_cfg(compile_settings: CompileSettings, plan_file: str):
    """The fairseq config run.sh gives a run with these settings (the fields the runtime reads)."""
    s = compile_settings
    return SimpleNamespace(
        task=SimpleNamespace(
            precision="fp32" if s.precision == "fp16" else s.precision,
            plan_file=plan_file,
            sequence_length=s.seq_len,
            pack_sequences=s.packing,
            sequence_parallel=s.sequence_parallel,
        ),
        common=SimpleNamespace(fp16=s.precision == "fp16", bf16=False, amp=False, cpu=True),
        optimizer=SimpleNamespace(_name="torch_adamw"),
        dataset=SimpleNamespace(batch_size=s.batch_size),
        optimization=SimpleNamespace(update_freq=[s.grad_accu], clip_norm=s.clip_norm),
        model=SimpleNamespace(compile_layers=s.compiled, use_lora=s.lora_config is not None, lora_config=s.lora_config),
    )


def runtime_outcome(cfg, model, criterion, world_size: int):
    """``apply_plan`` on ``world_size`` fake ranks (this process is rank 0): its result, or the error."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        return apply_plan(cfg, model, criterion)
    except UserInputError as exc:
        return exc
    finally:
        dist.destroy_process_group()


def split_key(plan, lora: bool):
    return plan.tp, plan.pp, plan.virtual_stages_per_rank, plan.recompute_modules, lora


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_plan_the_search_lets_through_runs(family, tmp_path, request):
    if family == "custom":
        request.getfixturevalue("registered")
    make_config, _, head, classes, _ = FAMILIES[family]
    spec = spec_of(make_config())
    built, refusals = set(), set()
    refusing = {lora: build(family, lora) for lora in (False, True)}  # a refused plan is refused before any split
    for name, (fields, zero) in SETTINGS.items():
        compile_settings = CompileSettings(
            model="", plan_ngpus=1, mem_per_gpu=1e3, batch_size=BATCH_SIZE, seq_len=16, zero=zero, **fields
        )
        settings = dataclasses.replace(compile_settings.run_settings(), head=head, pipeline_loss=head == "causal_lm")
        lora = compile_settings.lora_config is not None
        model = FairseqModel(None, head, lora)  # what run_settings reads: the head and LoRA
        profile = stand_in_profile(spec, classes, compile_settings.precision, spec.tp_degrees(max(GPU_COUNTS)))
        for ngpus in GPU_COUNTS:
            scaling = 2 if zero else 1
            result = search(
                profile,
                Workload(batch_size=BATCH_SIZE, seq_len=16),
                Hardware(),
                ngpus,
                scaling,
                1e3,
                spec,
                settings,
                zero=zero,
            )
            if ngpus == 1:
                assert result.best is not None, (family, name)
            for candidate in result.candidates:
                plan = candidate.plan
                plan_file = tmp_path / f"{name}-{ngpus}.json"
                plan.save(str(plan_file))
                cfg = fairseq_cfg(compile_settings, str(plan_file))
                assert run_settings(cfg, model, criterion_for(head)) == settings  # the runtime reads the same settings
                if candidate.rejected:
                    key = (candidate.rejected[0], plan.tp, plan.pp)
                    if plan.plan_ngpus > 1 and key not in refusals:
                        refusals.add(key)
                        refused = runtime_outcome(cfg, refusing[lora], criterion_for(head), plan.world_size)
                        assert isinstance(refused, UserInputError) and candidate.rejected[0] in str(refused), (
                            family,
                            name,
                            plan,
                            candidate.rejected,
                            refused,
                        )
                    continue
                assert spec.unsupported(plan, settings) == []
                if split_key(plan, lora) in built:
                    continue
                built.add(split_key(plan, lora))
                outcome = runtime_outcome(cfg, build(family, lora), criterion_for(head), plan.world_size)
                assert not isinstance(outcome, Exception), (family, name, plan, outcome)
                assert outcome.plan == plan
                assert outcome.vocab_parallel == spec.vocab_parallel(plan.tp, plan.pp)
                assert (outcome.pipeline is not None) == (plan.pp > 1)
    assert len({key[:2] for key in built}) > 1, (family, built)  # plans over several GPUs ran too


def test_the_search_says_why_it_picks_no_plan():
    """Settings the runtime refuses for every plan of two GPUs give no plan, with the runtime's reason."""
    spec = spec_of(_llama())
    classes = FAMILIES["llama"][3]
    for fields, reason in ((dict(precision="fp16"), "--fp16 with tensor or pipeline parallel"),):
        settings = CompileSettings(model="", plan_ngpus=2, mem_per_gpu=1e3, batch_size=BATCH_SIZE, **fields)
        profile = stand_in_profile(spec, classes, settings.precision, spec.tp_degrees(2))
        result = search(
            profile, Workload(batch_size=BATCH_SIZE, seq_len=16), Hardware(), 2, 1, 1e3, spec, settings.run_settings()
        )
        assert result.best is None
        assert result.candidates and all(any(reason in r for r in c.rejected) for c in result.candidates)
    for fields, reason in (
        (dict(lora_config=""), "LoRA with pipeline parallel (pp 2) is not available yet"),
        (dict(compiled=True), "COMPILE=1 with pipeline parallel (pp 2) is not available yet"),
    ):
        settings = CompileSettings(model="", plan_ngpus=2, mem_per_gpu=1e3, batch_size=BATCH_SIZE, **fields)
        result = search(
            stand_in_profile(spec, classes, "fp32", spec.tp_degrees(2)),
            Workload(batch_size=BATCH_SIZE, seq_len=16),
            Hardware(),
            2,
            1,
            1e3,
            spec,
            settings.run_settings(),
        )
        assert result.best.plan.tp == 2
        piped = [c for c in result.candidates if c.plan.pp == 2]
        assert piped and all(c.rejected[0].startswith(reason) for c in piped), [c.rejected for c in piped]


def test_zero_levels_with_pipeline_stages_run_and_gradient_sharding_under_fairseq_half_is_refused(tmp_path):
    """ZeRO with pipeline stages runs (each stage sharded over its replicas by FSDP2); fairseq's --fp16 keeps
    data parallel on DDP, where ZeRO 2 and 3 are refused, by the spec and by the runtime alike."""
    spec = spec_of(_llama())
    pp_zero3 = Plan(plan_ngpus=2, scaling_factor=2, tp=1, pp=2, num_microbatches=2, zero=3)
    assert spec.unsupported(pp_zero3, RunSettings(batch_size=BATCH_SIZE)) == []
    fp16 = CompileSettings(model="", plan_ngpus=1, mem_per_gpu=1e3, batch_size=BATCH_SIZE, precision="fp16")
    dp_zero2 = Plan(plan_ngpus=1, scaling_factor=2, tp=1, pp=1, zero=2)
    reasons = spec.unsupported(dp_zero2, fp16.run_settings())
    assert reasons == [
        "USE_ZERO=2 shards gradients with FSDP2, which --fp16 cannot run with (its optimizer flattens the "
        "parameters: data parallel runs on fairseq's DDP, ZeRO 1 at most); use USE_ZERO=1 or 0, or "
        "PRECISION=bf16-master"
    ]
    assert spec.unsupported(dataclasses.replace(dp_zero2, zero=1), fp16.run_settings()) == []
    plan_file = tmp_path / "plan.json"
    dp_zero2.save(str(plan_file))
    refused = runtime_outcome(fairseq_cfg(fp16, str(plan_file)), build("llama", False), criterion_for("causal_lm"), 2)
    assert isinstance(refused, UserInputError) and str(refused) == reasons[0]
