"""benchmarks/single_gpu_speed.py's modules (speed_*.py): the speed-log medians and bookkeeping share on a synthetic log, the
parameter and FLOP counts against the numbers hf_baseline.py published for the H100, the shapes against
the baseline's own, the table of a failed row, and a timed-out process tree ended. CPU only, a few seconds."""

import importlib.util
import json
import sys
import time

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import speed_baseline  # noqa: E402
import speed_logs  # noqa: E402
import speed_models  # noqa: E402
import speed_processes  # noqa: E402
import speed_report  # noqa: E402
import speed_rows  # noqa: E402


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(update, step_s, compute_s, tokens=16384, peak=None):
    out = {"update": update, "step_s": step_s, "compute_s": compute_s, "tokens": tokens}
    if peak is not None:
        out.update(peak_allocated_bytes=peak, peak_reserved_bytes=peak + 2**30)
    return out


def test_speed_log_medians_and_bookkeeping(tmp_path):
    # Updates 1-2 are warm-up (slow, dropped). Timed updates 3-7, 16384 tokens each:
    #   step_s    2.0   2.5     1.0    4.0   2.0   -> median 2.0
    #   compute_s 1.8   2.0     0.9    3.0   1.9   -> median 1.9
    #   step-comp 0.2   0.5     0.1    1.0   0.1   -> median 0.2 -> bookkeeping 0.2 / 2.0 = 10%
    #   tokens/s  8192  6553.6  16384  4096  8192  -> median 8192 (not 16384 * 5 / 11.5 = 7123.5, the mean rate)
    # Peaks grow; the last update's (3 GiB allocated, 4 GiB reserved) is reported.
    records = [
        record(1, 30.0, 29.0, peak=2**30),
        record(2, 10.0, 9.0, peak=2**30),
        record(3, 2.0, 1.8, peak=2 * 2**30),
        record(4, 2.5, 2.0, peak=2 * 2**30),
        record(5, 1.0, 0.9, peak=2 * 2**30),
        record(6, 4.0, 3.0, peak=3 * 2**30),
        record(7, 2.0, 1.9, peak=3 * 2**30),
    ]
    log = tmp_path / "speed.jsonl"
    # Out of order, a blank line, and a last line cut off mid-write (a killed run): all tolerated.
    log.write_text("\n".join(json.dumps(r) for r in records[3:] + records[:3]) + '\n\n{"update": 8, "ste')
    summary = speed_logs.summarize_speed_log(speed_logs.read_speed_log(log), warmup=2)
    assert summary["timed_updates"] == 5
    assert summary["tokens_per_s"] == pytest.approx(8192)
    assert summary["step_median_s"] == pytest.approx(2.0)
    assert summary["compute_median_s"] == pytest.approx(1.9)
    assert summary["bookkeeping_share"] == pytest.approx(0.1)
    assert summary["peak_alloc_gib"] == pytest.approx(3.0)
    assert summary["peak_reserved_gib"] == pytest.approx(4.0)


def test_speed_log_without_peaks_or_timed_updates():
    cpu = [record(1, 1.0, 0.5), record(2, 1.0, 0.5)]  # a CPU run logs no peak memory
    summary = speed_logs.summarize_speed_log(cpu, warmup=1)
    assert summary["peak_alloc_gib"] is None and summary["tokens_per_s"] == pytest.approx(16384)
    with pytest.raises(ValueError, match="none after the 2 warm-up"):
        speed_logs.summarize_speed_log(cpu, warmup=2)


def test_parameter_counts():
    # 1.1B: per layer q,o 2048^2, k,v 2048*256, gate/up/down 2048*5632 = 44,040,192; x22 + lm_head 32000*2048.
    assert speed_models.linear_params(speed_models.MODEL_A) == 22 * 44_040_192 + 65_536_000 == 1_034_420_224
    # 8B: per layer q,o 4096^2, k,v 4096*1024, gate/up/down 4096*14336 = 218,103,808; x32 + lm_head 128256*4096.
    assert speed_models.linear_params(speed_models.MODEL_B) == 32 * 218_103_808 + 525_336_576 == 7_504_658_432
    # LoRA r=16: r * (in + out) per target; 1.1B q,o 65536, k,v 36864, gate/up/down 122880 -> 573,440 a layer.
    assert speed_models.lora_params(speed_models.MODEL_A) == 22 * 573_440
    # 8B: q,o 131072, k,v 81920, gate/up/down 294912 -> 1,310,720 a layer.
    assert speed_models.lora_params(speed_models.MODEL_B) == 32 * 1_310_720


@pytest.mark.parametrize(
    "model, mode, tokens_per_s, published_mfu",
    [
        # tokens/s and MFU vs 989 that hf_baseline.py published for one H100 (shared/bench/hf_baseline_h100.md).
        ("A", "full", 44_082, 0.326),
        ("A", "lora", 39_855, 0.214),
        ("B", "lora", 9_742, 0.330),
    ],
)
def test_mfu_matches_the_published_baseline(model, mode, tokens_per_s, published_mfu):
    shape = {"A": speed_models.MODEL_A, "B": speed_models.MODEL_B}[model]
    fpt = speed_models.flops_per_token(shape, mode, 2048)
    assert speed_models.mfu(fpt, tokens_per_s, speed_models.PEAK_DATASHEET) == pytest.approx(published_mfu, abs=5e-4)


def test_mfu_arithmetic_on_known_numbers():
    # Full FT of the 1.1B: 6 * 1,034,420,224 + 12 * 22 * 2048 * 2048 = 6,206,521,344 + 1,107,296,256.
    fpt = speed_models.flops_per_token(speed_models.MODEL_A, "full", 2048)
    assert fpt == 7_313_817_600
    # 10,000 tokens/s over a measured 731.38176 TFLOP/s matmul is exactly 10%.
    assert speed_models.mfu(fpt, 10_000, 731.38176e12) == pytest.approx(0.1)
    assert speed_models.mfu(fpt, 10_000, None) is None and speed_models.mfu(fpt, None, 989e12) is None
    assert speed_models.measured_matmul({"env_matmul": {"matmul_bf16_flops": [780e12, 800e12]}}) == 790e12
    assert speed_models.measured_matmul({"env_matmul": {"status": "error"}}) is None


@pytest.mark.parametrize("tiny", [False, True])
def test_shapes_are_the_baselines(monkeypatch, tiny):
    monkeypatch.delenv("ANCHOR_TINY", raising=False)
    if tiny:
        monkeypatch.setenv("ANCHOR_TINY", "1")
    baseline = load(REPO / "benchmarks" / "baseline" / "hf_variants.py", f"hf_variants_{tiny}")
    assert (baseline.MODEL_A, baseline.MODEL_B, baseline.SEQ) == (
        (speed_models.TINY_MODEL_A, speed_models.TINY_MODEL_B, speed_models.TINY_SEQ)
        if tiny
        else (speed_models.MODEL_A, speed_models.MODEL_B, speed_models.SEQ)
    )
    assert baseline.LORA_TARGETS == speed_models.LORA_TARGETS and baseline.PEAK_DATASHEET == speed_models.PEAK_DATASHEET
    assert set(speed_baseline.BASELINE_OF.values()) <= set(baseline.VARIANTS)
    assert {v for pair in speed_baseline.BASELINE_OF_DATA.values() for v in pair} <= set(baseline.ORDER)


def test_length_distributions_and_batches_grouped_by_length():
    """Both sides' variable-length data: uniform in [seq/8, seq]; chat-like lengths mostly a few hundred
    tokens with a tail to seq; batches grouped by length pad far less than batches in random order."""
    import numpy as np

    lengths = speed_baseline.baseline_lengths()
    rng = np.random.default_rng(0)
    uniform = lengths.sample_lengths("varlen", 4000, 2048, rng)
    assert min(uniform) >= 256 and max(uniform) <= 2048 and 1000 < np.mean(uniform) < 1300
    chat = lengths.sample_lengths("chat", 4000, 2048, rng)
    assert 200 < np.median(chat) < 400 and max(chat) == 2048 and min(chat) >= 16
    assert 0.05 < np.mean(np.array(chat) > 1024) < 0.15  # a tenth of the samples over half of seq

    def padding(order):
        batches = lengths.length_batches("chat", order, 8, 200, 2048)
        assert len(batches) == 200 and all(len(b) == 8 for b in batches)
        return sum(8 * max(b) - sum(b) for b in batches) / sum(8 * max(b) for b in batches)

    assert padding("grouped") < 0.2 < 0.5 < padding("random")


def test_rows_are_checked():
    rows = speed_rows.check_rows(speed_rows.VARIANTS)
    assert all(r["timeout"] > 0 and r["compile"] in (0, 1) for r in rows)
    with pytest.raises(ValueError, match="unknown keys"):
        speed_rows.check_rows([dict(name="x", model="A", mode="full", mb=8, precision="bf16", gc=1)])
    with pytest.raises(ValueError, match="model must be A or B"):
        speed_rows.check_rows([dict(name="x", model="C", mode="full", mb=8, precision="bf16")])


def test_table_shows_a_failed_row_with_its_log():
    ok = dict(
        name="1.1B-full-bf16",
        source="ours",
        model="A",
        mode="full",
        mb=8,
        precision="bf16",
        compile=0,
        recompute="",
        status="ok",
        tokens_per_s=50_000.0,
        mfu_989=0.37,
        mfu_measured=0.46,
        peak_alloc_gib=40.0,
        bookkeeping_share=0.02,
        ratio_to_hf=1.134,
    )
    failed = dict(
        name="1.1B-full-bf16master",
        source="ours",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=0,
        recompute="",
        status="failed",
        reason="run.sh exited with 2",
        tail="run.sh: error: PRECISION must be fp32, bf16 or fp16, got 'bf16-master'",
    )
    env = {"baseline_env": {"gpu": "NVIDIA H100 80GB HBM3"}, "driver_versions": {"torch": "2.11.0"}}
    settings = dict(seq=2048, tiny=False, steps=10, warmup=5, compile_warmup=8)
    table = speed_report.render_table([ok, failed], env, {}, settings)
    assert (
        "| ours 1.1B-full-bf16: PRECISION=bf16 COMPILE=0 | Llama 1.1B | full FT | 8 | 50,000 | 37.0% | 46.0% | "
        "40.0 | 2.0% | 1.13x |"
    ) in table
    assert "| ours 1.1B-full-bf16master: PRECISION=bf16-master COMPILE=0 | Llama 1.1B | full FT | 8 | failed |" in table
    assert "got 'bf16-master'" in table.split("## 1.1B-full-bf16master")[1]


def test_a_timed_out_process_tree_is_ended(tmp_path):
    log = tmp_path / "run.log"
    start = time.time()
    run = speed_processes.run_logged(
        ["bash", "-c", "sleep 60 & echo child $!; wait"], None, log, timeout=1, header="# h\n"
    )
    assert run["timed_out"] and time.time() - start < 10
    text = log.read_text()
    assert text.startswith("# h\n") and "killed after the 1 s timeout" in text
    child = int(text.split("child ")[1].split()[0])
    deadline = time.time() + 5
    while speed_processes.alive(child) and time.time() < deadline:  # init reaps the orphaned sleep
        time.sleep(0.05)
    assert not speed_processes.alive(child)


def test_a_failing_command_is_reported(tmp_path):
    run = speed_processes.run_logged(
        [sys.executable, "-c", "raise SystemExit(3)"], None, tmp_path / "x.log", timeout=30
    )
    assert run == dict(run, rc=3, timed_out=False)


def test_failure_excerpt_shows_the_workers_error_not_torchruns(tmp_path):
    log = tmp_path / "row.log"
    log.write_text(
        "\n".join(
            [
                "2026-11-28 06:19:27 | INFO | fairseq_cli.train | Start iterating over samples",
                "/site-packages/torch/nn/modules/module.py:1869: FutureWarning: Using a non-full backward hook",
                "Traceback (most recent call last):",
                '  File "fairseq/trainer.py", line 1, in train_step',
                '    raise FloatingPointError("gradients are Nan/Inf")',
                "FloatingPointError: gradients are Nan/Inf",
                "Traceback (most recent call last):",
                '  File "torch/distributed/run.py", line 1028, in main',
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
                "fairseq_cli.train FAILED",
            ]
        )
    )
    error, excerpt = speed_logs.failure_excerpt(log, lines=3)
    assert error == "FloatingPointError: gradients are Nan/Inf"
    assert excerpt.splitlines() == [
        '  File "fairseq/trainer.py", line 1, in train_step',
        '    raise FloatingPointError("gradients are Nan/Inf")',
        error,
    ]
    error, excerpt = speed_logs.failure_excerpt(log, at_error=False, lines=2)  # killed at its timeout: the last lines
    assert error == "" and excerpt.splitlines()[-1] == "fairseq_cli.train FAILED"
    (tmp_path / "sh.log").write_text("run.sh: error: COMPILE must be 0 or 1, got '2'\n")
    assert speed_logs.failure_excerpt(tmp_path / "sh.log")[0] == "run.sh: error: COMPILE must be 0 or 1, got '2'"
