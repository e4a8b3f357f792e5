"""The markdown report of benchmarks/single_gpu_speed.py: the machine, one table row per result, the logs of
the failed rows."""

import math
import statistics
from typing import List, Optional

from speed_models import LORA_R, MODEL_LABELS, measured_matmul


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_table(results: List[dict], environment: dict, baseline: dict, settings: dict) -> str:
    """The markdown report: a header with the machine, one table row per result (HF row first in each
    model/mode group), then the last log lines of every failed row."""
    env = environment["baseline_env"]
    versions = {k: env.get(k) or environment["driver_versions"].get(k) for k in ("torch", "transformers", "peft")}
    matmul = measured_matmul(baseline)
    end_rates = (baseline.get("matmul_end") or {}).get("matmul_bf16_flops")
    lines = [
        "# Speed on one GPU: fairseq-train (run.sh) against plain Hugging Face (hf_baseline.py)",
        "",
        f"GPU {env.get('gpu', '?')}; torch {versions['torch']}, transformers {versions['transformers']}, "
        f"peft {versions['peft']}; seq {settings['seq']}{' (tiny models)' if settings['tiny'] else ''}; "
        f"{settings['steps']} timed updates after {settings['warmup']} warm-up ({settings['compile_warmup']} "
        f"with COMPILE=1), medians of wall time per update; random weights and random tokens. HF rows: "
        "hf_baseline.py's own recipe (3 warm-up steps, CUDA-event step times).",
        f"Measured bf16 matmul: {_num(matmul and matmul / 1e12, '.1f')} TFLOP/s (baseline's probe at the start; "
        f"{_num(end_rates and statistics.median(end_rates) / 1e12, '.1f')} at its end). MFU counts flops as "
        "hf_baseline.py (recompute not counted). Bookkeeping = median(step - compute) / median(step) of our "
        "updates.",
        "",
        "| run | model | mode | micro-batch | tokens/s | MFU vs 989 | MFU vs measured matmul | peak GiB | "
        "fairseq bookkeeping | vs HF | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = []
    for r in results:
        if (r["model"], r["mode"]) not in order:
            order.append((r["model"], r["mode"]))
    failed = []
    for group in order:
        for r in sorted((r for r in results if (r["model"], r["mode"]) == group), key=lambda r: r["source"] != "hf"):
            model = MODEL_LABELS[r["model"]] + (" (tiny)" if settings["tiny"] else "")
            mode = "full FT" if r["mode"] == "full" else f"LoRA r{LORA_R}"
            if r["source"] == "hf":
                run = f"HF {r['name']}"
            else:
                run = f"ours {r['name']}: PRECISION={r['precision']} COMPILE={r['compile']}" + (
                    f" RECOMPUTE_MODULE_NAMES={r['recompute']}" if r["recompute"] else ""
                )
                run += f" USE_ZERO={r['zero']}" if r.get("zero") else ""
            if r["status"] != "ok":
                lines.append(
                    f"| {run} | {model} | {mode} | {r.get('mb', '-')} | {r['status']} | - | - | - | - | - | "
                    f"{r.get('reason', '')[:200].replace('|', '/')} |"
                )
                if r.get("tail"):
                    failed.append(r)
                continue
            notes = r.get("note", "")
            if r.get("plan_summary"):
                notes = "; ".join(
                    filter(
                        None,
                        [
                            notes,
                            f"compile pass: {r['plan_summary']}, predicted peak "
                            f"{r['predicted_peak_gib']:.1f} GiB"
                            + (
                                f" (tensors {r['predicted_alloc_gib']:.1f} against the measured allocated peak)"
                                if r.get("predicted_alloc_gib")
                                else ""
                            )
                            + f", step {r['predicted_step_s']:.3f} s",
                        ],
                    )
                )
            if r.get("loss_last") is not None and not math.isfinite(r["loss_last"]):
                notes = "; ".join(filter(None, [notes, "NON-FINITE LOSS"]))
            ratio = f"{r['ratio_to_hf']:.2f}x" if r.get("ratio_to_hf") is not None else "-"
            lines.append(
                f"| {run} | {model} | {mode} | {r['mb']} | {r['tokens_per_s']:,.0f} | {_pct(r['mfu_989'])} | "
                f"{_pct(r.get('mfu_measured'))} | {_num(r.get('peak_alloc_gib'), '.1f')} | "
                f"{_pct(r.get('bookkeeping_share'))} | {ratio} | {notes} |"
            )
    for r in failed:
        lines += ["", f"## {r['name']}: {r['status']} ({r.get('reason', '')})", "", "```", r["tail"], "```"]
    return "\n".join(lines)
