"""The Hugging Face side of benchmarks/single_gpu_speed.py: which hf_baseline.py variants our rows are compared
with, the baseline run as a subprocess (with its bf16 matmul probe before and after), and its results as rows of
the report."""

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable, List, Tuple

from speed_logs import failure_excerpt
from speed_models import measured_matmul, mfu
from speed_processes import REPO, run_logged

BASELINE = REPO / "benchmarks" / "baseline" / "hf_baseline.py"
BASELINE_LENGTHS = REPO / "benchmarks" / "baseline" / "hf_lengths.py"

# (model, mode) -> the hf_baseline.py variant our rows of that model and mode are compared with.
BASELINE_OF = {
    ("A", "full"): "A1_fp32master_autocast",
    ("A", "lora"): "A5_lora_autocast",
    ("B", "lora"): "B5_lora_autocast_nogc",
}
# (model, mode, data) -> the hf_baseline.py variants on that variable-length data: random order, then grouped
# by length (the one our rows on that data are compared with, in trained tokens/s)
BASELINE_OF_DATA = {
    ("A", "full", "varlen"): ("A1_varlen_random", "A1_varlen_grouped"),
    ("A", "full", "chat"): ("A1_chat_random", "A1_chat_grouped"),
}


def baseline_lengths():
    """The baseline's hf_lengths.py as a module (its length distributions are the data of both sides)."""
    spec = importlib.util.spec_from_file_location("hf_lengths", BASELINE_LENGTHS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_variants(rows: List[dict]) -> List[str]:
    """The baseline variants the ``rows`` are compared with: by model and mode, then by variable-length data."""
    keys = {(r["model"], r["mode"]) for r in rows if r["data"] == "fixed"}
    variants = [variant for key, variant in BASELINE_OF.items() if key in keys]
    data_keys = {(r["model"], r["mode"], r["data"]) for r in rows}
    variants += [v for key, pair in BASELINE_OF_DATA.items() if key in data_keys for v in pair]
    return variants


def run_baseline(
    variants: List[str], folder: Path, budget: float, steps: int, tiny: bool, log: Callable[[str], None]
) -> Tuple[dict, str]:
    """hf_baseline.py for ``variants`` within ``budget`` seconds, its files in ``folder``: (its results, by
    variant, empty when it wrote none; a status line)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("anchor_log.txt", "anchor_results.json", "anchor_table.md"):
        (folder / stale).unlink(missing_ok=True)  # the baseline appends to its log
    env = dict(
        os.environ,
        OUT=str(folder),
        PYTHONUNBUFFERED="1",
        ANCHOR_BUDGET_S=str(int(budget)),
        ANCHOR_ONLY=",".join(["env_matmul", *variants, "matmul_end"]),
        ANCHOR_STEPS=str(steps),
    )
    env.pop("ANCHOR_TINY", None)
    if tiny:
        env["ANCHOR_TINY"] = "1"
    log(f"HF baseline: {env['ANCHOR_ONLY']} (budget {budget:.0f} s)")
    run = run_logged([sys.executable, str(BASELINE)], env, folder / "stdout.log", budget + 60)
    results_file = folder / "anchor_results.json"
    baseline = json.loads(results_file.read_text()) if results_file.is_file() else {}
    status = ("timed out" if run["timed_out"] else f"rc {run['rc']}") + f" in {run['wall_s']:.0f} s"
    log(f"HF baseline done: {status}")
    return baseline, status


def baseline_row(variant: str, baseline: dict, status: str, log_file: Path) -> dict:
    """The report row of one baseline variant from the baseline's results (``status``: the baseline run's, for
    a variant without a result; ``log_file``: its output, whose last lines a failed row shows)."""
    of = {value: (*key, "fixed") for key, value in BASELINE_OF.items()}
    of.update({value: key for key, pair in BASELINE_OF_DATA.items() for value in pair})
    model, mode, data = of[variant]
    result = dict(name=variant, source="hf", model=model, mode=mode, data=data)
    record = baseline.get(variant)
    best = (record or {}).get("best")
    if best is None:
        failure = (record or {}).get("status", f"no result (baseline {status})")
        attempts = (record or {}).get("attempts", [])
        reasons = "; ".join(f"mb {a.get('mb')}: {a.get('status')} {a.get('error', '')[:200]}" for a in attempts)
        return dict(
            result,
            status="failed",
            reason=f"{failure}{': ' + reasons if reasons else ''}",
            tail=failure_excerpt(log_file)[1],
        )
    matmul = measured_matmul(baseline)
    return dict(
        result,
        status="ok",
        note=(record.get("desc") or "")[:120],
        mb=best["mb"],
        tokens_per_s=best["tokens_per_s"],
        mfu_989=best["mfu_989"],
        mfu_measured=mfu(best["flops_per_token"], best["tokens_per_s"], matmul),
        peak_alloc_gib=best["peak_alloc_GiB"],
        peak_reserved_gib=best["peak_reserved_GiB"],
        flops_per_token=best["flops_per_token"],
        step_median_s=best["step_median_s"],
        loss_last=best.get("loss_last"),
        n_linear=best.get("n_linear_incl_lm_head"),
        n_lora=best.get("n_lora"),
    )
