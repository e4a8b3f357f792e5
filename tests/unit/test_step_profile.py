"""--profile-updates: which updates, how kernel names are grouped, what the summary says."""

import gzip
import json
import subprocess
import sys

import pytest

from fairseq_ext.cube.step_profile import (
    kind_of,
    parse_updates,
    summarize,
    summary_markdown,
    trace_idle,
    trace_kernel_times,
)
from fairseq_ext.errors import UserInputError
from tests.helpers import REPO


def test_parse_updates():
    assert parse_updates("") is None and parse_updates(None) is None
    assert parse_updates("8:10") == (8, 10)
    assert parse_updates(" 3 ") == (3, 3)
    for bad in ("0:2", "5:4", "a:b", "1:2:3", "-1"):
        with pytest.raises(UserInputError, match="FIRST:LAST"):
            parse_updates(bad)


@pytest.mark.parametrize(
    "name, kind",
    [
        # H100/H200 kernel names as torch.profiler reports them
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>>", "attention"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled (fused)"),
        ("triton_poi_fused_mul_silu_1", "compiled (fused)"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise",
        ),
        (
            "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t>>",
            "reduction",
        ),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
        ("void at::native::_fused_adamw_kernel_cuda_impl<float>", "optimizer"),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
        ("Memcpy HtoD (Pinned -> Device)", "copy"),
        (
            "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::"
            "{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}>",
            "copy",
        ),
        # CPU operators (a CPU-only run)
        ("aten::addmm", "matmul"),
        ("aten::mm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::mul", "elementwise"),
        ("aten::something_new", "other"),
    ],
)
def test_kind_of_kernel_names(name, kind):
    assert kind_of(name) == kind


def test_summary_groups_time_per_update():
    times = {"nvjet_a": 6000.0, "sm90_xmma_gemm_b": 2000.0, "flash_fwd_kernel": 1500.0, "ncclDevKernel_x": 500.0}
    summary = summarize(times, updates=2, device="cuda")
    assert summary["total_ms_per_update"] == pytest.approx(5.0)
    kinds = {k["kind"]: k for k in summary["kinds"]}
    assert kinds["matmul"]["ms_per_update"] == pytest.approx(4.0) and kinds["matmul"]["share"] == pytest.approx(0.8)
    assert [k["kind"] for k in summary["kinds"]] == ["matmul", "attention", "communication"]
    assert summary["top"][0] == {"name": "nvjet_a", "kind": "matmul", "ms_per_update": 3.0, "share": 0.6}
    text = summary_markdown(summary)
    assert "CUDA kernels' own time, 5.0 ms per update" in text and "| matmul | 4.00 | 80.0% |" in text


def test_summary_lists_operators_by_input_shapes():
    summary = summarize(
        {"nvjet_a": 3000.0},
        updates=1,
        device="cuda",
        op_times_us={"aten::mm [[4096, 4096], [4096, 16]]": 500.0, "aten::mm [[4096, 4096], [4096, 4096]]": 2500.0},
    )
    assert [t["name"] for t in summary["top_operators"]] == [
        "aten::mm [[4096, 4096], [4096, 4096]]",
        "aten::mm [[4096, 4096], [4096, 16]]",
    ]
    assert "| `aten::mm [[4096, 4096], [4096, 16]]` | 0.50 | 16.7% |" in summary_markdown(summary)
    assert summarize({"aten::mm": 1.0}, updates=1, device="cpu")["top_operators"] == []


TRACE = {
    "traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 100.0, "dur": 3000.0},
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 3600.0, "dur": 1000.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 4100.0, "dur": 500.0},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 0.0, "dur": 9000.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 3200.0, "dur": 800.0},
    ]
}


def test_trace_kernel_times_count_gpu_work_only():
    assert trace_kernel_times(TRACE) == {"nvjet_sm90_tst_256x128": 4000.0, "Memcpy HtoD (Pinned -> Device)": 500.0}


def test_trace_idle_is_the_span_less_the_union_of_kernels():
    # a second stream's kernel inside another's, and one sticking out past it: no idle between them
    events = TRACE["traceEvents"] + [
        {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_add_0", "ts": 200.0, "dur": 100.0},
        {"ph": "X", "cat": "kernel", "name": "flash_fwd_kernel", "ts": 4500.0, "dur": 300.0},
        {"ph": "X", "cat": "kernel", "name": "fused_adamw", "ts": 5000.0, "dur": 100.0},
    ]
    idle = trace_idle({"traceEvents": events})
    assert idle["span_us"] == pytest.approx(5000.0)
    assert idle["idle_us"] == pytest.approx(500.0 + 200.0)
    assert idle["gaps"] == [
        {"us": 500.0, "after": "nvjet_sm90_tst_256x128", "before": "nvjet_sm90_tst_256x128"},
        {"us": 200.0, "after": "flash_fwd_kernel", "before": "fused_adamw"},
    ]
    assert trace_idle({"traceEvents": []}) == {"span_us": 0.0, "idle_us": 0.0, "gaps": []}
    summary = summarize(trace_kernel_times({"traceEvents": events}), updates=2, device="cuda", idle=idle)
    assert summary["idle_ms_per_update"] == pytest.approx(0.35) and summary["idle_share"] == pytest.approx(0.14)
    assert (
        "GPU idle (no kernel running) between the first and the last kernel: 0.35 ms per update of 2.5 (14.0%)"
        in summary_markdown(summary)
    )


def test_profile_summary_script_reads_a_gzipped_trace(tmp_path):
    path = tmp_path / "trace_rank0.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(TRACE, handle)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "profile_summary.py"), str(path), "--updates", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "2.2 ms per update" in result.stdout and "| matmul | 2.00 | 88.9% |" in result.stdout
    assert (
        "GPU idle (no kernel running) between the first and the last kernel: 0.25 ms per update of 2.2" in result.stdout
    )
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "profile_summary.py"), str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "profile_summary: error: cannot read the trace" in bad.stderr
    assert "Traceback" not in bad.stderr
