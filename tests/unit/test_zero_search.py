"""ZeRO levels in the compile pass: memory and communication of each level worked by hand on a toy model, the
GPU kinds' cost parameters, and the shapes of the data-parallel issue on paper (Llama-3-8B on two 80 GB
H100s, Llama-3-70B on 64 GPUs, Llama-3.1-405B on 512), each searched on its config alone (no weights)."""

import json
import time
from pathlib import Path

import pytest
import torch

from fairseq_ext.cube.compile import CompileSettings, compile_plan, format_report
from fairseq_ext.cube.cost import Workload, estimate
from fairseq_ext.cube.data_parallel_cost import (
    DataParallelBytes,
    data_parallel_seconds,
    one_rank_copy_seconds,
    reduce_bytes,
)
from fairseq_ext.cube.hardware import GPU_KINDS, Hardware, gpu_kind_of, hardware_for
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.runtime.precision import reduce_dtype
from fairseq_ext.cube.search import Fixed, zero_options
from fairseq_ext.errors import UserInputError
from scripts import plan_report
from tests.unit.test_search import BARE, LLAMA3_8B, toy_profile

LLAMA3_8B_CONFIG = json.loads((Path(LLAMA3_8B) / "config.json").read_text())
SHAPES = {  # Llama-3 70B and Llama-3.1 405B: the 8B config with their sizes
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128),
}


def toy_plan(zero: int, scaling_factor: int = 2) -> Plan:
    return Plan(plan_ngpus=1, scaling_factor=scaling_factor, tp=1, pp=1, zero=zero)


def test_memory_of_each_zero_level_worked_by_hand():
    # 4 layers of 100 parameters, embedding and head of 50 (500 in all), fp32 + Adam: 4 + 4 + 8 bytes each; one
    # micro-batch of 10 tokens, 2 scale units. Activations 4 x 1000 x 10 = 40000; gradients appear in backward.
    # Level 0 (FSDP2 replicas, no DDP buckets): states 500 x 16 = 8000 less the gradients 2000 = 6000: 46000
    # after the forward; the head's backward leaves its gradients (200) and the last layer's holds its
    # unsharded and float32 reduce gradients 100 x 8 = 800 before freeing its 10000: 47000.
    # Level 1 (S = 2): states 4000 less gradients 1000 = 3000, all weights all-gathered 2000: 45000; the head's
    # backward adds its unsharded and float32 reduce gradients 50 x 8 = 400 (45400) and leaves 100 (45100);
    # the last layer's adds 100 x 8 = 800: 45900.
    # Level 3: only the root's 100 weights and two layers' 200 are whole: 1200 bytes instead of 2000: 45100.
    profile, work = toy_profile(num_layers=4), Workload(batch_size=1, seq_len=10)
    peaks = {zero: estimate(profile, toy_plan(zero), work, BARE).peak_bytes for zero in (0, 1, 2, 3)}
    assert peaks == {0: 47000, 1: 45900, 2: 45900, 3: 45100}
    # accumulating, level 1 keeps whole gradients (2000, not 1000) through the update, level 2 their shards
    accumulating = Workload(batch_size=1, seq_len=10, grad_accu=2)
    whole, shards = (estimate(profile, toy_plan(zero), accumulating, BARE).peak_bytes for zero in (1, 2))
    assert whole - shards == 1000
    # one GPU alone: level 0 trains without FSDP2 (no buckets, no reduce buffers); at a level >= 1 FSDP2 runs
    # over one rank (S = 1): level 0's 47000 on FSDP2 plus the gathered weights beside the shards, all of them
    # at level 1 (2000), the root's and two layers' at level 3 (1200)
    alone = {zero: estimate(profile, toy_plan(zero, scaling_factor=1), work, BARE).peak_bytes for zero in (0, 1, 3)}
    assert alone == {0: 48000 - 2000 + 200, 1: 47000 + 2000, 3: 47000 + 1200}
    # hybrid groups: 2 groups of 2 shard in pairs (S = 2), as 2 scale units do
    hybrid = Plan(plan_ngpus=1, scaling_factor=4, tp=1, pp=1, zero=1, zero_n_groups=2)
    assert estimate(profile, hybrid, work, BARE).peak_bytes == peaks[1]


def test_communication_of_each_zero_level_worked_by_hand():
    # 1 GB/s inside a node of 2 GPUs, 0.5 GB/s between nodes, no latency; 1 GB of weights, 2 GB of gradients,
    # 2 passes per update over 10 layers, 1 s of compute.
    hw = Hardware(
        gpus_per_node=2,
        intra_node_bandwidth=1e9,
        inter_node_bandwidth=0.5e9,
        intra_node_latency=0.0,
        inter_node_latency=0.0,
    )
    volume = DataParallelBytes(weights=1e9, grads=2e9)

    def seconds(plan):
        return data_parallel_seconds(plan, hw, volume, passes=2, compute=1.0, layers=10)

    # level 0 over 4 GPUs (two nodes): all-reduce 2 x 3/4 x 2 GB at 0.5 GB/s = 6 s once; it hides behind the
    # last pass's backward (2/3 of 0.5 s) but one layer's 0.6 s
    total, exposed = seconds(Plan(plan_ngpus=1, scaling_factor=4, tp=1, pp=1))
    assert total == pytest.approx(6.0) and exposed == pytest.approx(6.0 - 1 / 3 + 0.6)
    # level 1 on 2 GPUs of one node: per pass all-gather 1/2 x 1 GB + reduce-scatter 1/2 x 2 GB = 1.5 s
    total, exposed = seconds(Plan(plan_ngpus=1, scaling_factor=2, tp=1, pp=1, zero=1))
    assert total == pytest.approx(3.0) and exposed == pytest.approx(2.0 + 3.0 / 20)
    # level 1 accumulating reduces once per update: all-gathers 2 x 0.5 s + one reduce-scatter of 1 s
    total, _ = data_parallel_seconds(
        Plan(plan_ngpus=1, scaling_factor=2, tp=1, pp=1, zero=1), hw, volume, 2, 1.0, 10, grad_reductions=1
    )
    assert total == pytest.approx(2.0)
    # level 3 gathers the weights again in the backward: 2 s per pass
    total, _ = seconds(Plan(plan_ngpus=1, scaling_factor=2, tp=1, pp=1, zero=3))
    assert total == pytest.approx(4.0)
    # hybrid: shards in pairs inside a node (1.5 s) + all-reduce of the 1 GB shard across the 2 nodes
    # (2 x 1/2 x 1 GB at 0.5 GB/s = 2 s): 3.5 s per pass
    total, _ = seconds(Plan(plan_ngpus=1, scaling_factor=4, tp=1, pp=1, zero=1, zero_n_groups=2))
    assert total == pytest.approx(7.0)
    # sharded across all 4 (two nodes): 3/4 x 3 GB at 0.5 GB/s = 4.5 s per pass
    total, _ = seconds(Plan(plan_ngpus=1, scaling_factor=4, tp=1, pp=1, zero=1))
    assert total == pytest.approx(9.0)


def test_one_gpu_on_fsdp2_costs_copies_in_memory():
    # 1 GB of bf16 weights, 500M gradient elements reduced in float32, 1 TB/s: level 1 copies the weights once
    # (read and write: 2 GB) and each gradient bf16 -> float32 input, which is the output -> bf16 (2 + 4 + 4 + 2
    # = 12 bytes: 6 GB): 8 ms; level 3 gathers again in the backward (+2 GB), and reduces each of 2 passes
    hw = Hardware(hbm_bandwidth=2e12, one_rank_copy_efficiency=0.5)
    one_gpu = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, zero=1)
    assert one_gpu.on_fsdp and not Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1).on_fsdp
    assert not Plan(plan_ngpus=2, scaling_factor=1, tp=2, pp=1, zero=3).on_fsdp  # one unit of several GPUs
    assert one_rank_copy_seconds(one_gpu, hw, 1e9, 500_000_000, 2, 4, 1, 1) == pytest.approx(0.008)
    level3 = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, zero=3)
    assert one_rank_copy_seconds(level3, hw, 1e9, 500_000_000, 2, 4, 2, 2) == pytest.approx(0.008 + 0.012)
    # bf16 gradients reduced in bf16 (bf16-lean, and bf16-master on one GPU): no cast back, 2 + 2 bytes each
    assert one_rank_copy_seconds(one_gpu, hw, 1e9, 500_000_000, 2, 2, 1, 1) == pytest.approx(0.004)


def test_the_cost_model_reduces_bf16_master_gradients_in_float32():
    """The bytes the cost model counts per reduced gradient element follow the runtime's FSDP2 policy
    (``precision.reduce_dtype``): float32 for bf16-master's bf16 gradients summed over several units, bf16 for
    bf16-lean's, and the gradients' own on one GPU alone (nothing is summed)."""
    assert reduce_bytes("bf16-master", 2, 2) == 4 and reduce_dtype("bf16-master", 2) == torch.float32
    assert reduce_bytes("bf16-master", 2, 1) == 2 and reduce_dtype("bf16-master", 1) is None
    assert reduce_bytes("bf16-lean", 2, 8) == 2
    assert reduce_bytes("fp8", 2, 2) == 4 and reduce_bytes("fp8-lean", 2, 2) == 2  # as stored: bf16-master, bf16-lean
    assert reduce_bytes("fp32", 4, 2) == 4


def test_zero_options_respect_the_user_and_group_by_node():
    assert zero_options(1, 1, 8, None, None) == [(0, 1)]
    # one GPU alone: the level the user set (FSDP2 over one rank); one unit of several GPUs has none to run
    assert zero_options(1, 1, 8, 3, 1) == [(3, 1)] and zero_options(1, 2, 8, 3, 1) == [(0, 1)]
    # 16 replicas of one GPU on nodes of 8: across all, or in 2 groups of the 8 that share a node
    assert zero_options(16, 1, 8, None, None) == [(0, 1), (1, 1), (1, 2), (3, 1), (3, 2)]
    assert zero_options(8, 8, 8, None, None) == [(0, 1), (1, 1), (3, 1)]  # a unit fills a node: no groups
    assert zero_options(16, 1, 8, 2, None) == [(2, 1), (2, 2)]
    assert zero_options(16, 1, 8, 3, 4) == [(3, 4)]
    with pytest.raises(UserInputError, match="ZERO_N_GROUPS 3 does not divide CUBE_SCALING_FACTOR 16"):
        zero_options(16, 1, 8, 1, 3)


def test_gpu_kinds_are_chosen_by_device_name_and_the_cost_params_file_overrides_them(tmp_path):
    assert gpu_kind_of("NVIDIA H200") == "H200" and gpu_kind_of("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_kind_of("Tesla V100-SXM2-16GB") == "H100"
    assert hardware_for("H200") is GPU_KINDS["H200"] and hardware_for("H200") != hardware_for("H100")
    with pytest.raises(UserInputError, match="unknown GPU kind 'A100'; choose one of H100, H200"):
        hardware_for("A100")
    params = tmp_path / "params.json"
    params.write_text('{"inter_node_bandwidth": 25e9}')
    args = plan_report.parse_args(
        ["--model", LLAMA3_8B, "--plan-ngpus", "1", "--mem-per-gpu", "70", "--gpu-kind", "H200"]
        + ["--cost-params", str(params), "--use-zero", "3", "--zero-n-groups", "auto"]
    )
    settings = plan_report.settings_from(args)
    assert settings.hardware.efficiency == GPU_KINDS["H200"].efficiency
    assert settings.hardware.inter_node_bandwidth == 25e9
    assert (settings.zero, settings.zero_n_groups) == (3, None)
    auto = plan_report.settings_from(
        plan_report.parse_args(["--model", LLAMA3_8B, "--plan-ngpus", "1", "--mem-per-gpu", "70"])
    )
    assert (auto.zero, auto.zero_n_groups) == (None, None)


@pytest.mark.parametrize("value", ["4", "one", "-1"])
def test_a_bad_use_zero_is_one_line(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_report.parse_args(["--model", LLAMA3_8B, "--plan-ngpus", "1", "--use-zero", value])
    assert exit_info.value.code == 2
    assert "USE_ZERO must be a ZeRO level 0..3 or auto" in capsys.readouterr().err


def test_llama3_8b_on_two_80gb_h100s_fits_without_tp_and_without_full_recompute():
    """Two scale units of one H100 each, full FT, seq 4096, micro-batch 1, bf16-master, COMPILE=1 (as FSDP2 ran
    it at 70.3 GiB on H200s): replicas (level 0) and weights kept whole (level 1) do not fit; level 3 does."""
    compiled = compile_plan(
        CompileSettings(
            model=LLAMA3_8B,
            plan_ngpus=1,
            scaling_factor=2,
            mem_per_gpu=74,
            batch_size=1,
            seq_len=4096,
            precision="bf16-master",
            compiled=True,
            zero=None,
            zero_n_groups=None,
            hardware=hardware_for("H100"),
        )
    )
    plan, best = compiled.plan, compiled.result.best
    assert plan is not None, compiled.error
    assert plan.tp == 1 and plan.zero == 3 and "LlamaDecoderLayer" not in plan.recompute_modules
    assert best.cost.peak_gib <= 74
    report = format_report(compiled)
    assert "ZeRO levels not chosen (the best plan of each, and why):" in report
    for level in (0, 1):
        line = next(
            line for line in report.splitlines() if line.startswith(f"  ZeRO-{level}: tp=1, pp=1, ZeRO-{level}")
        )
        assert ": over MEM_PER_GPU (" in line, report


@pytest.mark.parametrize(
    "shape, plan_ngpus, batch_size, grad_accu, fixed",
    [
        # 64 GPUs: 8 scale units of 8; tp fixed to the one the search takes, to profile one tp degree here
        ("70B", 8, 4, 8, Fixed(tp=8)),
        # 512 GPUs: 8 scale units of 64 (pipeline stages across 8 nodes; tp 8 is the only one BATCH_SIZE allows)
        ("405B", 64, 8, 16, Fixed()),
    ],
)
def test_llama3_70b_and_405b_shapes_find_a_plan_in_70_gb(tmp_path, shape, plan_ngpus, batch_size, grad_accu, fixed):
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA3_8B_CONFIG, **SHAPES[shape])))
    start = time.perf_counter()
    args = ["--model", str(tmp_path), "--plan-ngpus", str(plan_ngpus), "--scaling-factor", "8"]
    args += ["--mem-per-gpu", "70", "--batch-size", str(batch_size), "--gradient-accu-num", str(grad_accu)]
    args += ["--sequence-length", "4096", "--precision", "bf16-master", "--gpus-per-node", "8"]
    settings = plan_report.settings_from(plan_report.parse_args(args))
    compiled = compile_plan(CompileSettings(**{**settings.__dict__, "fixed": fixed}))
    assert time.perf_counter() - start < 120
    assert compiled.plan is not None, compiled.error
    assert compiled.plan.zero >= 1 and compiled.result.best.cost.peak_gib <= 70
    assert not compiled.result.best.rejected
