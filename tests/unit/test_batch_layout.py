"""The cost of variable-length batches: what packed, padded and token-budget micro-batches compute
(``cube/batch_layout.py``), how the cost model charges them, and MAX_TOKENS in the compile pass."""

from dataclasses import replace

import pytest

from fairseq_ext.cube.batch_layout import (
    ATTENTION_TILE,
    CAUSAL,
    VARLEN,
    causal_work,
    first_lengths,
    from_micro_batches,
    full_rows,
    micro_batches,
    token_budget,
)
from fairseq_ext.cube.batch_padding import LengthRule
from fairseq_ext.cube.compile import CompileSettings, check_plan_is_current, compile_plan, model_fingerprint
from fairseq_ext.cube.cost import Hardware, Workload, estimate
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.profile import load_config, profile_model
from fairseq_ext.errors import UserInputError
from tests.helpers import MODEL_DIR

SEQ = 256
ONE = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1)
HW = Hardware(allocator_slack=0.0, workspace_bytes=0.0)


@pytest.fixture(scope="module")
def profile():
    return profile_model(load_config(str(MODEL_DIR)), SEQ, "bf16-master", compiled=True)


def test_layouts_count_tokens_and_attention_tiles_by_hand():
    full = full_rows(4, SEQ)
    assert (full.tokens, full.peak_tokens, full.kernel, full.attention_scale(SEQ)) == (4 * SEQ, 4 * SEQ, CAUSAL, 1)
    # two micro-batches of packed rows: documents of one tile each and one of a whole row
    packed = from_micro_batches([[[128, 128], [64]], [[256]]], packed=True)
    tile = ATTENTION_TILE**2
    assert packed.kernel == VARLEN
    assert (packed.tokens, packed.peak_tokens) == ((320 + 256) / 2, 320)
    assert packed.work_per_token == pytest.approx((3 * tile + 3 * tile) / 576)
    assert packed.attention_scale(SEQ) == pytest.approx(6 * tile / 576 / (3 * tile / 256))
    # padded rows compute their padding through the causal kernel (no mask: pad tokens come last)
    padded = from_micro_batches([[[100], [300]]], packed=False)
    assert (padded.tokens, padded.kernel) == (600, CAUSAL)
    assert padded.work_per_token == pytest.approx(2 * 6 * tile / 600)
    # under COMPILE=1 at the length the runtime pads to (batch_padding.LengthRule: 300 -> 320)
    compiled = from_micro_batches([[[100], [300]]], packed=False, padded_length=LengthRule(compiled=True))
    assert (compiled.tokens, compiled.peak_tokens) == (640, 640)
    assert compiled.work_per_token == pytest.approx(2 * 6 * tile / 640)
    assert causal_work(1) == tile and causal_work(2 * ATTENTION_TILE + 1) == 6 * tile


def test_micro_batches_pack_sort_and_cut_by_samples_or_tokens():
    lengths = [300, 100, 50, 200, 40]  # 300 is cut to SEQ
    assert micro_batches(lengths, SEQ, batch_size=2) == [[[40], [50]], [[100], [200]], [[256]]]
    packed = micro_batches(lengths, SEQ, batch_size=8, packing=True)
    assert sorted(n for rows in packed for row in rows for n in row) == [40, 50, 100, 200, 256]
    assert all(sum(row) <= SEQ for rows in packed for row in rows)
    # at most 256 padded tokens a micro-batch: the longest row times the rows
    assert micro_batches(lengths, SEQ, max_tokens=256) == [[[40], [50]], [[100]], [[200]], [[256]]]
    with pytest.raises(ValueError):
        micro_batches(lengths, SEQ)


def test_packed_documents_cost_their_attention_and_tokens_and_memory_the_largest_micro_batch(profile):
    layer = profile.module(1, "layers")
    base = estimate(profile, ONE, Workload(4, SEQ), HW)
    # the same tokens as full rows, in documents of one tile each: the attention core runs 1/3 of the work at
    # the variable-length kernel's speed, everything else as for full rows
    docs = [[[128, 128] for _ in range(4)]]
    packed = estimate(profile, ONE, Workload(4, SEQ, layout=from_micro_batches(docs, packed=True)), HW)
    assert packed.peak_bytes == pytest.approx(base.peak_bytes)
    scale = (2 * ATTENTION_TILE**2 / SEQ) / (causal_work(SEQ) / SEQ)
    core = 3 * layer.attention_flops_per_token * profile.num_layers * 4 * SEQ
    rate = HW.device_flops * HW.efficiency * HW.compiled_speedup
    expected = base.parts["compute_and_tp"] + core * (scale / HW.varlen_attention_speed - 1) / rate
    assert packed.parts["compute_and_tp"] == pytest.approx(expected, rel=1e-9)
    assert layer.attention_flops_per_token == pytest.approx(4 * SEQ * profile.hidden_size)
    # half the tokens: half the compute and less memory at the peak
    half = from_micro_batches([[[128] * 4]], packed=True)
    small = estimate(profile, ONE, Workload(4, SEQ, layout=half), HW)
    assert small.peak_bytes < base.peak_bytes
    assert small.parts["compute_and_tp"] < packed.parts["compute_and_tp"] / 1.9
    # padded rows cost what full rows of their padded length cost
    padded = estimate(profile, ONE, Workload(4, SEQ, layout=from_micro_batches([[[SEQ], [1], [1], [1]]], False)), HW)
    assert padded.parts["compute_and_tp"] == pytest.approx(base.parts["compute_and_tp"], rel=1e-9)
    assert padded.peak_bytes == pytest.approx(base.peak_bytes)


def test_an_update_takes_at_least_the_host_time_and_longer_at_a_new_padded_length(profile):
    tiny = Workload(4, SEQ, layout=from_micro_batches([[[8]]], packed=False))
    cost = estimate(profile, ONE, tiny, HW)
    assert cost.parts["compute_and_tp"] + cost.parts["optimizer"] < HW.host_seconds_per_pass == cost.step_time
    first = estimate(profile, ONE, replace(tiny, new_lengths=1), HW)
    assert first.step_time == pytest.approx(HW.host_seconds_per_pass + HW.new_length_seconds)
    # padded lengths under COMPILE=1 (64-token buckets) seen first; packed micro-batches count none
    rule = LengthRule(sequence_length=SEQ, compiled=True)
    assert first_lengths([[[10], [60]], [[64]], [[65]], [[100], [3]], [[256]]], False, rule) == [1, 0, 1, 0, 1]
    assert first_lengths([[[10, 20]], [[40]]], True, rule) == [0, 0]


def test_recomputed_layers_run_the_attention_core_again(profile):
    plan = replace(ONE, recompute_modules=(profile.layer_class,))
    layout = from_micro_batches([[[128, 128] for _ in range(4)]], packed=True)
    eager = estimate(profile, plan, Workload(4, SEQ), HW).parts["compute_and_tp"]
    packed = estimate(profile, plan, Workload(4, SEQ, layout=layout), HW).parts["compute_and_tp"]
    scale = (2 * ATTENTION_TILE**2 / SEQ) / (causal_work(SEQ) / SEQ)
    core = 4 * profile.module(1, "layers").attention_flops_per_token * profile.num_layers * 4 * SEQ
    rate = HW.device_flops * HW.efficiency * HW.compiled_speedup
    assert packed == pytest.approx(eager + core * (scale / HW.varlen_attention_speed - 1) / rate, rel=1e-9)


def test_max_tokens_plans_a_micro_batch_of_the_token_budget():
    """MAX_TOKENS = 2 rows of SEQUENCE_LENGTH costs as BATCH_SIZE 2 does; the plan's fingerprint names
    MAX_TOKENS (a plan compiled for it is stale under BATCH_SIZE and the other way round); pipeline plans split
    the budget's rows of SEQUENCE_LENGTH into micro-batches and cost as those of BATCH_SIZE 2 do."""
    settings = CompileSettings(
        model=str(MODEL_DIR), plan_ngpus=1, mem_per_gpu=8.0, seq_len=SEQ, precision="bf16-master", compiled=True
    )
    by_samples = compile_plan(replace(settings, batch_size=2))
    by_tokens = compile_plan(replace(settings, batch_size=32, max_tokens=2 * SEQ))
    half = compile_plan(replace(settings, batch_size=32, max_tokens=SEQ))
    peak = lambda c: c.result.best.cost.peak_bytes  # noqa: E731
    assert peak(by_tokens) == pytest.approx(peak(by_samples))
    assert peak(half) < peak(by_tokens)
    assert token_budget(SEQ, SEQ).tokens == SEQ
    config = load_config(str(MODEL_DIR))
    assert model_fingerprint(config, replace(settings, max_tokens=2 * SEQ)) != model_fingerprint(config, settings)
    current = dict(seq_len=SEQ, grad_accu=1, precision="bf16-master", compiled=True)
    check_plan_is_current(by_tokens.plan, config, batch_size=0, max_tokens=2 * SEQ, **current)
    with pytest.raises(UserInputError, match="MAX_TOKENS"):
        check_plan_is_current(by_tokens.plan, config, batch_size=32, **current)
    with pytest.raises(UserInputError, match="MAX_TOKENS"):
        compile_plan(replace(settings, max_tokens=0))
    two_by_tokens, two_by_samples = (
        compile_plan(replace(settings, plan_ngpus=2, compiled=False, **batch))
        for batch in (dict(max_tokens=2 * SEQ), dict(batch_size=2))
    )
    pipelines = {c.plan: c for c in two_by_tokens.result.candidates if c.plan.pp == 2}
    assert any(not c.rejected for c in pipelines.values()), pipelines
    assert {c.plan.num_microbatches for c in pipelines.values()} == {2}  # the budget's 2 rows, one a micro-batch
    by_samples_pipelines = [c for c in two_by_samples.result.candidates if c.plan.pp == 2]
    assert by_samples_pipelines and {c.plan for c in by_samples_pipelines} == set(pipelines)
    for candidate in by_samples_pipelines:
        assert pipelines[candidate.plan].cost.peak_bytes == pytest.approx(candidate.cost.peak_bytes)
