"""benchmarks/multi_gpu_speed.py on the CPU: its command line (several GPU counts in one command), the settings of
our runs, and the table of FSDP2 and one row per run of ours (``--ours-args``)."""

import argparse
import importlib.util
import sys

import pytest

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


def test_one_command_runs_2_4_and_8_gpus_each_in_its_folder(tmp_path):
    speed = _load()
    args = speed.parse_args(["--gpus", "2,4,8", "--shape", "8B", "--mem-per-gpu", "70", "--out", str(tmp_path)])
    runs = speed.runs_of(args)
    assert [(r.gpus, r.out) for r in runs] == [(n, tmp_path / f"{n}gpus") for n in (2, 4, 8)]
    assert (args.shape, args.seq, args.precision, args.compile, args.zero) == ("8B", 4096, "bf16-master", 1, "auto")
    one = speed.runs_of(speed.parse_args(["--gpus", "4", "--out", str(tmp_path)]))
    assert [(r.gpus, r.out) for r in one] == [(4, tmp_path)]
    tiny = speed.parse_args(["--tiny", "--out", str(tmp_path)])
    assert (tiny.shape, tiny.seq, tiny.precision, tiny.compile, tiny.fsdp2_compile) == ("tiny", 64, "fp32", 0, 0)


@pytest.mark.parametrize("gpus", ["", "2,x", "0", "2,-4"])
def test_bad_gpu_counts_are_one_line(gpus, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load().parse_args(["--gpus", gpus, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--gpus must be GPU counts separated by commas (e.g. 2,4,8)" in capsys.readouterr().err


def test_our_runs_leave_the_zero_level_to_the_compile_pass_unless_fixed(tmp_path):
    speed = _load()
    paths = dict(model=tmp_path / "m", data=tmp_path / "d", speed_log=tmp_path / "s.jsonl", output_dir=tmp_path / "o")
    for zero, expected in (("auto", None), ("3", "3")):
        args = speed.parse_args(["--gpus", "8", "--mb", "2", "--zero", zero, "--out", str(tmp_path)])
        settings = speed.ours_settings(speed.runs_of(args)[0], **paths)
        assert settings.get("USE_ZERO") == expected
        assert (settings["NPROC_PER_NODE"], settings["CUBE_SCALING_FACTOR"], settings["PLAN_NGPUS"]) == ("8", "8", "1")
        assert (settings["BATCH_SIZE"], settings["MEM_PER_GPU"], settings["OUTPUT_DIR"]) == (
            "2",
            "110",
            str(paths["output_dir"]),
        )


def test_the_compile_pass_predictions_are_read_from_its_report():
    from fairseq_ext.cube.compile import Compiled, format_report
    from fairseq_ext.cube.cost import Workload
    from fairseq_ext.cube.search import search
    from tests.unit.test_search import BARE, TOY_SPEC, toy_profile

    result = search(toy_profile(4), Workload(batch_size=1, seq_len=10), BARE, 1, 2, 1.0, TOY_SPEC, zero=None)
    report = format_report(Compiled(result.best.plan, result, 0.1))
    found = _load().predictions(report)
    assert found["plan_summary"].startswith(f"tp=1, pp=1, ZeRO-{result.best.plan.zero}")
    assert found["predicted_step_s"] == float(f"{result.best.cost.step_time:.3f}")
    assert found["predicted_peak_gib"] == float(f"{result.best.cost.peak_gib:.2f}")
    assert _load().predictions("no plan") == {}
