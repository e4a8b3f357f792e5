"""benchmarks/multi_gpu_speed.py: the table of FSDP2 and one row per run of ours (``--ours-args``)."""

import argparse
import importlib.util
import sys

from tests.helpers import REPO


def _load():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("multi_gpu_speed", REPO / "benchmarks" / "multi_gpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_has_a_row_per_run_of_ours_with_its_arguments():
    speed = _load()
    args = argparse.Namespace(
        shape="tiny", gpus=2, seq=64, mb=1, fsdp2_compile=0, fsdp2_checkpoint=0, precision="fp32", compile=0
    )
    fsdp2 = dict(
        status="ok",
        tokens_per_s_per_gpu=1000.0,
        peak_alloc_gib=1.0,
        step_median_s=0.1,
        matmul_bf16_flops=None,
        gpu="cpu",
    )
    ours = [
        dict(
            fsdp2,
            extra_args="",
            predicted_peak_gib=1.2,
            predicted_step_s=0.1,
            plan_summary="tp=1, pp=1",
            peak_reserved_gib=1.1,
        ),
        dict(fsdp2, extra_args="--gradient-as-bucket-view", tokens_per_s_per_gpu=1100.0),
        dict(status="failed", extra_args="--bad", reason="run.sh rc 1", error="fairseq_ext: error: x"),
    ]
    text = speed.table(args, fsdp2, ours)
    rows = [line for line in text.splitlines() if line.startswith("| ours")]
    assert len(rows) == 3
    assert rows[0].startswith("| ours: run.sh, PRECISION=fp32 COMPILE=0, compile-pass plan | 1,000 |")
    assert rows[1].startswith(
        "| ours: run.sh, PRECISION=fp32 COMPILE=0, compile-pass plan, `--gradient-as-bucket-view` | 1,100 |"
    )
    assert "| failed |" in rows[2] and "fairseq_ext: error: x" in rows[2]
