"""The compile pass's two peaks: the tensors' (what torch.cuda.max_memory_allocated reads, compared with GPU
runs) and the one MEM_PER_GPU must hold (allocator slack and workspaces on top), both in its report."""

import sys

from fairseq_ext.cube.compile import CompileSettings, compile_plan, format_report
from fairseq_ext.cube.cost import GIB, Hardware, Workload, estimate
from fairseq_ext.cube.plan import Plan
from tests.helpers import REPO
from tests.unit.test_search import toy_profile

sys.path.insert(0, str(REPO / "benchmarks"))
import single_gpu_speed  # noqa: E402


def test_the_peak_is_the_tensors_peak_with_allocator_slack_and_workspace():
    hw = Hardware(allocator_slack=0.1, workspace_bytes=1000.0)
    cost = estimate(toy_profile(), Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1), Workload(1, 10), hw)
    assert cost.parts["allocated"] == 23800  # the toy problem worked by hand (test_search.py)
    assert cost.peak_bytes == 23800 * 1.1 + 1000


def test_the_report_gives_both_peaks_and_the_benchmark_reads_them(tmp_path, monkeypatch):
    compiled = compile_plan(
        CompileSettings(
            model=str(REPO / "cube_examples" / "finetune_hf_model" / "model" / "tiny-llama"),
            plan_ngpus=1,
            mem_per_gpu=20,
            batch_size=2,
            seq_len=64,
            precision="bf16-master",
        )
    )
    cost = compiled.result.best.cost
    (tmp_path / "plan.plan.log").write_text(format_report(compiled))  # what `run.sh compile` prints
    (tmp_path / "plan.json").write_text(compiled.plan.to_json())
    bench = single_gpu_speed.Benchmark.__new__(single_gpu_speed.Benchmark)
    bench.logs, bench.log = tmp_path, lambda message: None
    monkeypatch.setattr(single_gpu_speed, "run_logged", lambda *args, **kwargs: {"rc": 0})
    planned = bench.compile_plan(dict(name="plan", mem_per_gpu=20), {}, tmp_path)
    assert planned["predicted_peak_gib"] == round(cost.peak_gib, 2)
    assert planned["predicted_alloc_gib"] == round(cost.parts["allocated"] / GIB, 2)
    assert planned["predicted_alloc_gib"] < planned["predicted_peak_gib"]
