"""The Plan: JSON round trip, fingerprint, validation messages, atomic save, default rule."""

import dataclasses
import json
import os
from dataclasses import replace

import pytest

from fairseq_ext.cube import plan as plan_module
from fairseq_ext.cube.model_spec import ModelSpec, RunSettings
from fairseq_ext.cube.plan import Plan, default_plan
from fairseq_ext.errors import UserInputError


def full_plan(**changes) -> Plan:
    """A plan that sets every field away from its default."""
    fields = dict(
        plan_ngpus=8,
        scaling_factor=4,
        tp=2,
        pp=4,
        pp_schedule="Interleaved1F1B",
        num_microbatches=8,
        virtual_stages_per_rank=2,
        stage_boundaries=(2, 4, 6, 8, 10, 12, 14),
        zero=3,
        zero_n_groups=2,
        recompute_modules=("LlamaDecoderLayer",),
        model_fingerprint="abc123",
        version=1,
    )
    fields.update(changes)
    return Plan(**fields)


def test_zero_is_a_level_and_older_true_false_files_load_as_1_and_0():
    for old, level in ((True, 1), (False, 0)):
        data = json.loads(full_plan().to_json())
        data["zero"] = old
        plan = Plan.from_json(json.dumps(data))
        assert plan.zero == level and type(plan.zero) is int
    sharded = full_plan(zero=2, scaling_factor=4, zero_n_groups=2)  # hybrid: shard inside pairs of units
    assert (sharded.dp_replicate, sharded.dp_shard) == (2, 2)
    replicated = full_plan(zero=0, scaling_factor=4, zero_n_groups=2)  # level 0: no sharding, groups ignored
    assert (replicated.dp_replicate, replicated.dp_shard) == (4, 1)


def test_json_round_trip_is_equal():
    plan = full_plan().validate()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert isinstance(again.stage_boundaries, tuple) and isinstance(again.recompute_modules, tuple)
    assert json.loads(plan.to_json())["stage_boundaries"] == [2, 4, 6, 8, 10, 12, 14]


def test_fingerprint_is_stable_and_pinned():
    plan = full_plan()
    fingerprint = plan.fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert Plan.from_json(plan.to_json()).fingerprint() == fingerprint
    # Pinned: a change of the canonical form (key order, separators, hash) would make saved plans look stale.
    assert fingerprint == "51be6eb061d3e7d8"


@pytest.mark.parametrize(
    "field, value",
    [
        ("plan_ngpus", 16),
        ("scaling_factor", 2),
        ("tp", 4),
        ("pp", 2),
        ("pp_schedule", "1F1B"),
        ("num_microbatches", 16),
        ("virtual_stages_per_rank", 3),
        ("stage_boundaries", (1, 4, 6, 8, 10, 12, 14)),
        ("zero", 2),
        ("zero_n_groups", 4),
        ("recompute_modules", ()),
        ("model_fingerprint", "abc124"),
        ("version", 2),
    ],
)
def test_fingerprint_changes_with_every_field(field, value):
    assert field in {f.name for f in dataclasses.fields(Plan)}
    assert full_plan(**{field: value}).fingerprint() != full_plan().fingerprint()


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(tp=0, plan_ngpus=0), r"plan_ngpus must be a positive integer, got 0"),
        (dict(scaling_factor=-1), r"scaling_factor must be a positive integer, got -1"),
        (dict(num_microbatches=0), r"num_microbatches must be a positive integer"),
        (dict(virtual_stages_per_rank=0), r"virtual_stages_per_rank must be a positive integer"),
        (dict(tp=True), r"tp must be a positive integer, got True"),
        (dict(tp=3, pp=2, plan_ngpus=4), r"tp 3 x pp 2 = 6 does not equal PLAN_NGPUS 4"),
        (
            dict(pp_schedule="ZeroBubble"),
            r"unknown pp_schedule 'ZeroBubble'; choose one of GPipe, 1F1B, Interleaved1F1B",
        ),
        (
            dict(pp_schedule="Interleaved1F1B", tp=2, pp=2, num_microbatches=2),
            r"Interleaved1F1B needs virtual_stages_per_rank >= 2, got 1",
        ),
        (
            dict(virtual_stages_per_rank=2, tp=2, pp=2, num_microbatches=2),
            r"virtual_stages_per_rank 2 needs pp_schedule Interleaved1F1B, got 1F1B",
        ),
        (dict(tp=1, pp=4, plan_ngpus=4, num_microbatches=2), r"1F1B with pp 4 needs at least 4 micro-batches, got 2"),
        (dict(tp=2, pp=2, pp_schedule="GPipe", num_microbatches=1), r"GPipe with pp 2 needs at least 2 micro-batches"),
        (
            dict(tp=2, pp=2, num_microbatches=2, stage_boundaries=(1, 2)),
            r"stage_boundaries has 2 entries but pp 2 x virtual_stages_per_rank 1 = 2 stages need 1",
        ),
        (
            dict(
                tp=2,
                pp=2,
                num_microbatches=2,
                pp_schedule="Interleaved1F1B",
                virtual_stages_per_rank=2,
                stage_boundaries=(3, 6),
            ),
            r"= 4 stages need 3",
        ),
        (
            dict(
                tp=2,
                pp=2,
                num_microbatches=2,
                pp_schedule="Interleaved1F1B",
                virtual_stages_per_rank=2,
                stage_boundaries=(3, 3, 6),
            ),
            r"stage_boundaries \[3, 3, 6\] must be strictly increasing",
        ),
        (
            dict(
                tp=2,
                pp=2,
                num_microbatches=2,
                pp_schedule="Interleaved1F1B",
                virtual_stages_per_rank=2,
                stage_boundaries=(5, 3, 6),
            ),
            r"must be strictly increasing",
        ),
        (dict(tp=2, pp=2, num_microbatches=2, stage_boundaries=(0,)), r"stage_boundaries \[0\] must start above 0"),
        (
            dict(tp=2, pp=2, num_microbatches=2, stage_boundaries=("2",)),
            r"stage_boundaries must be a list of layer indices",
        ),
        (dict(zero=True, zero_n_groups=0), r"zero_n_groups must be a positive integer, got 0"),
        (
            dict(zero=True, scaling_factor=4, zero_n_groups=3),
            r"zero_n_groups 3 does not divide CUBE_SCALING_FACTOR 4.*choose a zero_n_groups that divides 4",
        ),
        (dict(zero="yes"), r"zero must be a ZeRO level 0, 1, 2 or 3 \(USE_ZERO\), got 'yes'"),
        (dict(zero=4), r"zero must be a ZeRO level 0, 1, 2 or 3 \(USE_ZERO\), got 4"),
        (dict(recompute_modules=("",)), r"recompute_modules must be a list of module class names"),
        (dict(version=2), r"plan version 2 is not supported"),
    ],
)
def test_validate_rejects_with_what_to_change(changes, match):
    fields = dict(plan_ngpus=4, scaling_factor=2, tp=4, pp=1)
    fields.update(changes)
    with pytest.raises(UserInputError, match=match):
        Plan(**fields).validate()


@pytest.mark.parametrize(
    "plan",
    [
        Plan(plan_ngpus=4, scaling_factor=2, tp=4, pp=1),
        Plan(
            plan_ngpus=4,
            scaling_factor=1,
            tp=1,
            pp=4,
            pp_schedule="GPipe",
            num_microbatches=4,
            stage_boundaries=(1, 2, 3),
        ),
        Plan(
            plan_ngpus=2,
            scaling_factor=1,
            tp=1,
            pp=2,
            pp_schedule="Interleaved1F1B",
            virtual_stages_per_rank=2,
            num_microbatches=2,
            stage_boundaries=(2, 4, 6),
        ),
        # zero_n_groups is ignored without ZeRO; with ZeRO it divides scaling_factor.
        Plan(plan_ngpus=1, scaling_factor=3, tp=1, pp=1, zero=False, zero_n_groups=2),
        Plan(plan_ngpus=1, scaling_factor=6, tp=1, pp=1, zero=True, zero_n_groups=3),
    ],
)
def test_validate_accepts_consistent_plans(plan):
    assert plan.validate() is plan


def test_from_json_rejects_unknown_keys_listing_them():
    data = json.loads(full_plan().to_json())
    data.update(tensor_parallel=2, extra=1)
    with pytest.raises(UserInputError, match=r"unknown plan keys: extra, tensor_parallel; known keys: plan_ngpus"):
        Plan.from_json(json.dumps(data))


def test_from_json_rejects_missing_required_keys():
    data = json.loads(full_plan().to_json())
    del data["tp"], data["scaling_factor"]
    with pytest.raises(UserInputError, match=r"missing required keys: scaling_factor, tp"):
        Plan.from_json(json.dumps(data))


def test_from_json_fills_defaults_and_validates():
    assert Plan.from_json('{"plan_ngpus": 2, "scaling_factor": 1, "tp": 2, "pp": 1}') == Plan(
        plan_ngpus=2, scaling_factor=1, tp=2, pp=1
    )
    with pytest.raises(UserInputError, match=r"tp 2 x pp 1 = 2 does not equal PLAN_NGPUS 4"):
        Plan.from_json('{"plan_ngpus": 4, "scaling_factor": 1, "tp": 2, "pp": 1}')


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"plan_ngpus": 2,', r"plan is not valid JSON: .*line 1"),
        ("", r"plan is not valid JSON"),
        ("[1, 2]", r"plan must be a JSON object, got list"),
    ],
)
def test_from_json_rejects_malformed_json(text, match):
    with pytest.raises(UserInputError, match=match):
        Plan.from_json(text)


def test_save_and_load(tmp_path):
    path = tmp_path / "sub" / "plan.json"
    plan = full_plan()
    plan.save(str(path))
    assert Plan.load(str(path)) == plan
    assert path.read_text() == plan.to_json()
    assert os.listdir(path.parent) == ["plan.json"]


def test_save_replaces_the_existing_file_whole(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("x" * 10_000)  # longer than a plan: a non-truncating write would leave a tail
    plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
    plan.save(str(path))
    assert path.read_text() == plan.to_json()
    assert os.listdir(tmp_path) == ["plan.json"]


def test_failing_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    old = full_plan()
    old.save(str(path))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(plan_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1).save(str(path))
    assert path.read_text() == old.to_json()
    assert os.listdir(tmp_path) == ["plan.json"]


def test_save_refuses_an_invalid_plan(tmp_path):
    path = tmp_path / "plan.json"
    with pytest.raises(UserInputError, match="does not equal PLAN_NGPUS"):
        Plan(plan_ngpus=4, scaling_factor=1, tp=3, pp=1).save(str(path))
    assert not path.exists() and os.listdir(tmp_path) == []


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(UserInputError, match=r"no plan file at .*nope\.json"):
        Plan.load(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text('{"plan_ngpus": 1, "scaling_factor": 1, "tp": 1, "pp": 1, "tpp": 2}')
    with pytest.raises(UserInputError, match=r"bad\.json: unknown plan keys: tpp"):
        Plan.load(str(bad))


def test_world_size_and_check_world_size():
    plan = Plan(plan_ngpus=4, scaling_factor=2, tp=4, pp=1)
    assert plan.world_size == 8
    plan.check_world_size(8)
    with pytest.raises(
        UserInputError,
        match=r"^PLAN_NGPUS 4 x CUBE_SCALING_FACTOR 2 = 8 does not equal the world "
        r"size 6 \(NPROC_PER_NODE x NNODES\)$",
    ):
        plan.check_world_size(6)


def test_model_spec_checks_the_split():
    spec = ModelSpec(
        model_type="toy",
        tp_rules={"layers.*.q": "colwise"},
        num_layers=4,
        decoder=True,
        tied_embeddings=False,
        vocab_size=8,
        tp_sizes=dict(num_attention_heads=32, num_key_value_heads=6, intermediate_size=96),
    )
    settings = RunSettings(batch_size=2)
    plan = Plan(plan_ngpus=6, scaling_factor=1, tp=3, pp=2, num_microbatches=2)
    assert spec.unsupported(plan, settings) == [
        "tp 3 does not divide num_attention_heads 32; choose a tp that divides it"
    ]
    for name, size in (("num_key_value_heads", 8), ("intermediate_size", 100)):
        odd = replace(spec, tp_sizes={**spec.tp_sizes, "num_attention_heads": 12, name: size})
        assert odd.unsupported(plan, settings) == [f"tp 3 does not divide {name} {size}; choose a tp that divides it"]
    fits = replace(spec, tp_sizes={**spec.tp_sizes, "num_attention_heads": 12}, num_layers=2)
    assert fits.unsupported(plan, settings) == []
    assert fits.tp_degrees(6) == [1, 2, 3, 6]
    [reason] = replace(fits, num_layers=1).unsupported(plan, settings)
    assert reason.startswith("pp 2 x virtual_stages_per_rank 1 = 2 pipeline stages exceed num_hidden_layers 1")

    four = replace(fits, tp_sizes={}, num_layers=5)
    interleaved = Plan(
        plan_ngpus=2,
        scaling_factor=1,
        tp=1,
        pp=2,
        pp_schedule="Interleaved1F1B",
        virtual_stages_per_rank=2,
        num_microbatches=2,
        stage_boundaries=(1, 2, 4),
    )
    assert four.unsupported(interleaved, settings) == []
    [reason] = replace(four, num_layers=4).unsupported(interleaved, settings)
    assert reason.startswith("stage_boundaries [1, 2, 4] name layer 4 but the model has 4 layers")
    assert any(
        "= 4 pipeline stages exceed num_hidden_layers 3" in r
        for r in replace(four, num_layers=3).unsupported(interleaved, settings)
    )


@pytest.mark.parametrize(
    "plan_ngpus, gpus_per_node, tp, pp, num_microbatches",
    [
        (8, 8, 8, 1, 1),
        (16, 8, 8, 2, 2),
        (4, 8, 4, 1, 1),
        (12, 8, 4, 3, 3),
    ],
)
def test_default_plan_keeps_tensor_parallel_inside_a_node(plan_ngpus, gpus_per_node, tp, pp, num_microbatches):
    plan = default_plan(plan_ngpus=plan_ngpus, scaling_factor=2, gpus_per_node=gpus_per_node)
    assert (plan.tp, plan.pp, plan.num_microbatches) == (tp, pp, num_microbatches)
    assert plan.pp_schedule == "1F1B" and plan.virtual_stages_per_rank == 1 and plan.stage_boundaries == ()
    assert plan.plan_ngpus == plan_ngpus and plan.scaling_factor == 2 and plan.world_size == 2 * plan_ngpus


def test_default_plan_passes_zero_and_recompute_and_validates():
    plan = default_plan(4, 4, 8, zero=True, zero_n_groups=2, recompute_modules=["LlamaDecoderLayer"])
    assert (plan.zero, plan.zero_n_groups, plan.recompute_modules) == (True, 2, ("LlamaDecoderLayer",))
    with pytest.raises(UserInputError, match=r"zero_n_groups 3 does not divide CUBE_SCALING_FACTOR 4"):
        default_plan(4, 4, 8, zero=True, zero_n_groups=3)
    with pytest.raises(UserInputError, match=r"gpus_per_node must be a positive integer, got 0"):
        default_plan(4, 1, 0)


def test_zero_is_a_level_and_true_from_older_plans_reads_as_level_1():
    data = json.loads(full_plan().to_json())
    older = Plan.from_json(json.dumps(dict(data, zero=True)))
    assert older.zero == 1 and type(older.zero) is int
    assert Plan.from_json(json.dumps(dict(data, zero=3))).zero == 3
    assert Plan.from_json(json.dumps(dict(data, zero=False))).zero == 0


def test_model_spec_says_where_sequence_parallel_and_compiled_tp_blocks_run():
    llama = ModelSpec(
        model_type="llama",
        tp_rules={"layers.*.self_attn.q_proj": "colwise"},
        tp_sizes={},
        num_layers=4,
        decoder=True,
        tied_embeddings=False,
        vocab_size=8,
        llama_style=True,
    )
    tp2 = Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1)
    pp2 = Plan(plan_ngpus=4, scaling_factor=1, tp=2, pp=2, num_microbatches=2)
    both = RunSettings(sequence_parallel=True, compiled=True, batch_size=2)
    assert llama.unsupported(tp2, both) == []
    assert llama.unsupported(Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1), replace(both, head="seq_cls")) == []
    [lora] = llama.unsupported(tp2, replace(both, lora=True))
    assert lora.startswith("SEQUENCE_PARALLEL=1 with LoRA is not available yet")
    classify = llama.unsupported(tp2, replace(both, head="seq_cls"))
    assert [r.split(" ")[0] for r in classify] == ["COMPILE=1", "SEQUENCE_PARALLEL=1"], classify
    piped = llama.unsupported(pp2, both)
    assert any(r.startswith("SEQUENCE_PARALLEL=1 with pipeline parallel (pp 2)") for r in piped)
    assert any(r.startswith("COMPILE=1 with pipeline parallel (pp 2)") for r in piped)
    [gpt2] = replace(llama, model_type="gpt2", decoder=False, llama_style=False).unsupported(tp2, both)
    assert gpt2.startswith("SEQUENCE_PARALLEL=1 shards Llama-style decoders") and "'gpt2' is not one" in gpt2
