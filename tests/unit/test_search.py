"""The plan search: a hand-checked toy problem, Llama-3-8B on 8 GPUs at MEM_PER_GPU=20, the refusal at
MEM_PER_GPU=1, and monotonicity (more memory never gives a slower predicted plan)."""

import dataclasses

import pytest

from fairseq_ext.cube.compile import CompileSettings, compile_plan, format_report
from fairseq_ext.cube.cost import GIB, Hardware, Workload, estimate
from fairseq_ext.cube.model_spec import ModelSpec, RunSettings, spec_of
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.profile import Activations, ModelProfile, ModuleProfile, load_config
from fairseq_ext.cube.search import search
from scripts import plan_report
from tests.helpers import REPO

LLAMA3_8B = str(REPO / "tests" / "assets" / "llama3-8b-config")
BARE = Hardware(allocator_slack=0.0, workspace_bytes=0.0)
LLAMA3_8B_SPEC = spec_of(load_config(LLAMA3_8B))


def toy_profile(num_layers: int = 2) -> ModelProfile:
    """``num_layers`` decoder layers of 100 parameters that keep 1000 bytes per token (10 when recomputed);
    embedding and head of 50 parameters that keep nothing; tp=1 only."""
    layer = ModuleProfile(
        name="layers",
        class_name="Block",
        param_numel=100,
        sharded_numel=0,
        activations=Activations(per_token=1000.0),
        recompute={"Block": (Activations(per_token=10.0, transient_per_token=990.0), 1.0)},
        fwd_flops_per_token=1.0,
    )
    edge = dict(sharded_numel=0, activations=Activations(per_token=0.0))
    modules = {
        "embed": ModuleProfile(name="embed", class_name="Emb", param_numel=50, **edge),
        "layers": layer,
        "norm": ModuleProfile(name="norm", class_name="Norm", param_numel=0, **edge),
        "head": ModuleProfile(name="head", class_name="Head", param_numel=50, **edge),
    }
    return ModelProfile(
        model_type="toy",
        num_layers=num_layers,
        hidden_size=4,
        num_heads=1,
        num_kv_heads=1,
        intermediate_size=4,
        vocab_size=50,
        seq_len=10,
        precision="fp32",
        layer_class="Block",
        attention_class="Block",
        mlp_class="Block",
        tp_degrees=(1,),
        vocab_parallel={1: False},
        modules={1: modules},
        shared={1: Activations(per_token=0.0)},
    )


TOY_SPEC = ModelSpec(
    model_type="toy", tp_rules={}, tp_sizes={}, num_layers=2, decoder=True, tied_embeddings=False, vocab_size=50
)


def test_toy_problem_worked_by_hand():
    # 300 parameters, fp32 + Adam: weights 4 + Adam 8 = 12 bytes each before backward = 3600; gradients
    # (4 bytes) appear during backward. Batch 1 x 10 tokens.
    # No recompute: activations 2 layers x 1000 x 10 = 20000; the head's backward adds its gradients (50 x 4)
    # before any layer frees anything: 3600 + 20000 + 200 = 23800.
    # Recompute: kept 2 x 10 x 10 = 200; after the head 3600 + 200 + 200 = 4000; the last layer rebuilds
    # 990 x 10 = 9900 (13900), then leaves its gradients (400) and frees its 100: 4300; the first layer
    # rebuilds 9900 on that: 14200. The optimizer step needs only 300 x 16 = 4800.
    profile, work = toy_profile(), Workload(batch_size=1, seq_len=10)
    plain = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
    recomputed = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, recompute_modules=("Block",))
    assert estimate(profile, plain, work, BARE).peak_bytes == 23800
    assert estimate(profile, recomputed, work, BARE).peak_bytes == 14200
    # A budget between the two picks recompute; above both, the faster plan without it.
    assert search(profile, work, BARE, 1, 1, 20000 / GIB, TOY_SPEC).best.plan.recompute_modules == ("Block",)
    assert search(profile, work, BARE, 1, 1, 30000 / GIB, TOY_SPEC).best.plan.recompute_modules == ()
    assert search(profile, work, BARE, 1, 1, 10000 / GIB, TOY_SPEC).best is None


@pytest.fixture(scope="module")
def llama3_8b():
    from fairseq_ext.cube.compile import _profile

    # the cached profile compile_plan uses for the same model and settings: profiled once per test run
    return _profile(load_config(LLAMA3_8B).to_json_string(), 512, "bf16", (1, 2, 4, 8), "sdpa", False, None)


def test_llama3_8b_on_8_gpus_at_20gb_compiles():
    compiled = compile_plan(
        CompileSettings(model=LLAMA3_8B, plan_ngpus=8, mem_per_gpu=20, batch_size=4, seq_len=512, precision="bf16")
    )
    plan = compiled.plan
    assert plan is not None and plan.tp * plan.pp == 8, compiled.error
    plan.validate()
    assert spec_of(load_config(LLAMA3_8B)).unsupported(plan, RunSettings(precision="bf16", batch_size=4)) == []
    assert len(plan.model_fingerprint) == 16
    assert compiled.result.best.cost.peak_gib <= 20
    report = format_report(compiled)
    assert "chosen" in report and f'"tp": {plan.tp}' in report


def test_a_batch_too_big_for_memory_is_split_into_micro_batches():
    # BATCH_SIZE 32 x 512 tokens: no plan running the batch at once fits 24 GB (the smallest needs 28). The
    # search splits it: into pipeline micro-batches, or into parts accumulated inside the step, also where
    # pipeline stages are refused (COMPILE=1).
    from fairseq_ext.cube.search import Fixed

    settings = dict(model=LLAMA3_8B, plan_ngpus=8, mem_per_gpu=24, batch_size=32, seq_len=512, precision="bf16")
    whole = compile_plan(CompileSettings(**settings, fixed=Fixed(num_microbatches=1)))
    assert whole.plan is None and "raise MEM_PER_GPU" in whole.error
    split = compile_plan(CompileSettings(**settings)).plan
    assert split is not None and split.num_microbatches > 1 and len(split.stage_boundaries) == split.num_stages - 1
    packed = compile_plan(CompileSettings(**settings, compiled=True))
    assert packed.plan is not None and packed.plan.pp == 1 and packed.plan.num_microbatches > 1
    assert "COMPILE=1 with pipeline parallel" in format_report(packed)
    assert packed.result.best.cost.peak_gib <= 24


def test_mem_per_gpu_1_is_refused_with_the_smallest_budget(capsys):
    code = plan_report.main(
        ["--model", LLAMA3_8B, "--plan-ngpus", "8", "--mem-per-gpu", "1", "--precision", "bf16", "--batch-size", "4"]
    )
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and "DEBUG" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fairseq_ext: error: no plan fits MEM_PER_GPU=1: the smallest needs ")
    smallest = float(lines[0].split("the smallest needs ")[1].split(" GB")[0])
    assert f"raise MEM_PER_GPU to {int(smallest) + 1}" in lines[0]
    # ... and that budget does fit
    assert (
        compile_plan(
            CompileSettings(
                model=LLAMA3_8B,
                plan_ngpus=8,
                mem_per_gpu=int(smallest) + 1,
                batch_size=4,
                seq_len=512,
                precision="bf16",
            )
        ).plan
        is not None
    )


def test_more_memory_never_gives_a_slower_plan(llama3_8b):
    work = Workload(batch_size=8, seq_len=512)
    previous = float("inf")
    for budget in range(12, 81, 4):
        for refused in (True, False):  # COMPILE=1: pipeline plans refused
            best = search(
                llama3_8b, work, Hardware(), 8, 2, budget, LLAMA3_8B_SPEC, RunSettings(compiled=refused, batch_size=8)
            ).best
            if best is None:
                continue
            assert best.cost.peak_gib <= budget
            if refused:
                assert best.cost.step_time <= previous + 1e-12, (budget, best)
                previous = best.cost.step_time
    assert previous < float("inf")


def test_user_fixed_settings_are_respected(llama3_8b):
    work = Workload(batch_size=8, seq_len=512)
    from fairseq_ext.cube.search import Fixed

    result = search(
        llama3_8b,
        work,
        Hardware(),
        8,
        2,
        40,
        LLAMA3_8B_SPEC,
        zero=True,
        zero_n_groups=1,
        fixed=Fixed(tp=4, pp_schedule="GPipe", recompute_modules=("LlamaDecoderLayer",)),
    )
    assert result.candidates
    for c in result.candidates:
        assert c.plan.tp == 4 and c.plan.pp_schedule == "GPipe" and c.plan.zero
        assert c.plan.recompute_modules == ("LlamaDecoderLayer",)


def test_the_search_chooses_the_zero_level_unless_the_user_fixed_it(llama3_8b):
    """USE_ZERO unset: levels 0, 1 and 3, with pipeline stages too; set: that level only."""
    args = dict(
        profile=llama3_8b,
        work=Workload(batch_size=8, seq_len=512),
        hw=Hardware(),
        plan_ngpus=8,
        scaling_factor=2,
        budget_gib=80,
        spec=LLAMA3_8B_SPEC,
        settings=RunSettings(batch_size=8),
    )
    chosen = search(**args, zero=None, zero_n_groups=None)
    assert {c.plan.zero for c in chosen.candidates} == {0, 1, 3}
    assert any(c.plan.zero and c.plan.pp > 1 and not c.rejected for c in chosen.candidates)
    fixed = search(**args, zero=2, zero_n_groups=1)
    assert {(c.plan.zero, c.plan.zero_n_groups) for c in fixed.candidates} == {(2, 1)}


def test_a_refusal_names_the_closest_plans_and_one_setting_to_change():
    """PLAN_NGPUS=16 puts pipeline stages in every plan (tp stays within a node of 8), which the runtime
    refuses with COMPILE=1: a few lines name the closest plans and the setting, not every plan's reasons."""
    compiled = compile_plan(
        CompileSettings(
            model=LLAMA3_8B,
            plan_ngpus=16,
            mem_per_gpu=20,
            batch_size=32,
            seq_len=512,
            precision="bf16",
            compiled=True,
        )
    )
    assert compiled.plan is None
    lines = compiled.error.splitlines()
    assert len(lines) <= 6, compiled.error
    assert lines[0] == "no plan for PLAN_NGPUS=16 runs with these settings within MEM_PER_GPU=20; the closest:"
    assert all(line.startswith("  tp=") for line in lines[1:4]), compiled.error
    assert lines[4].startswith("change one setting: COMPILE=1 with pipeline parallel"), compiled.error
    assert "use COMPILE=0" in lines[4]


def test_sequence_parallel_keeps_the_norms_activations_for_a_share_of_the_tokens():
    # Hidden size 4, fp32: each norm saves its float32 input and its output, 4 x (4 + 4) = 32 bytes per token
    # (compiled: the output only, 16); under tp 2 each rank keeps them for half the tokens: two norms save
    # 32 (compiled 16) bytes per token in each layer, x 2 layers x 10 tokens = 640 (320) bytes less at the peak.
    base = toy_profile()
    profile = dataclasses.replace(
        base,
        tp_degrees=(1, 2),
        vocab_parallel={1: False, 2: False},
        modules={1: base.modules[1], 2: base.modules[1]},
        shared={1: base.shared[1], 2: base.shared[1]},
    )
    work, sequence_parallel = (
        Workload(batch_size=1, seq_len=10),
        Workload(batch_size=1, seq_len=10, sequence_parallel=True),
    )
    tp2, tp1 = Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1), Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
    assert (
        estimate(profile, tp2, work, BARE).peak_bytes - estimate(profile, tp2, sequence_parallel, BARE).peak_bytes
        == 640
    )
    compiled = dataclasses.replace(profile, compiled=True)
    saved = estimate(compiled, tp2, work, BARE).peak_bytes - estimate(compiled, tp2, sequence_parallel, BARE).peak_bytes
    assert saved == 320
    assert estimate(profile, tp1, work, BARE) == estimate(profile, tp1, sequence_parallel, BARE)  # nothing to shard
