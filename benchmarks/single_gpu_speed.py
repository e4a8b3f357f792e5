"""Speed on one GPU: tokens/s, MFU and peak memory of training through run.sh against plain Hugging Face.

Both sides run in the same invocation on the same GPU. The Hugging Face side is the team's baseline
script (``benchmarks/baseline/hf_baseline.py``), run as a subprocess for the variants that
match the selected rows plus its bf16 matmul probe (``ANCHOR_ONLY=env_matmul,...,matmul_end``). Our side
runs ``bash cube_examples/finetune_hf_model/run.sh --no-save --disable-validation`` once per row, each
in its own process with a timeout, and reads the per-update JSON lines run.sh writes to ``SPEED_LOG``.

Models are Llama configs with random weights (no downloads; shapes exactly as the baseline's MODEL_A and
MODEL_B), data is random token ids in [3, vocab) (never zeros), the first ``--warmup`` updates
(``--compile-warmup`` for COMPILE=1 rows) are dropped and the medians of the timed updates are reported:

- tokens/s = median over timed updates of tokens / step_s (step_s: the whole update, end to end, as
  the speed log measures it: CUDA events on GPUs);
- fairseq bookkeeping = median(step_s - compute_s) / median(step_s);
- peak GiB = the last update's peak_allocated_bytes / 2**30;
- MFU = flops/token * tokens/s / 989e12 (and / the matmul rate the baseline measured in this run), with
  flops/token as hf_baseline.py counts them: full FT 6N + 12 * layers * hidden * seq, LoRA
  4N + 6 N_lora + 12 * layers * hidden * seq, N = all nn.Linear weights including lm_head.

    python benchmarks/single_gpu_speed.py [--out DIR] [--only NAME,...] [--steps 10] [--budget 540]
    python benchmarks/single_gpu_speed.py --tiny --budget 1500          # CPU smoke run of the whole script

On the GPU machine (no fairseq there: install the wheels of .whl/ first; run.sh gets this Python as PYTHON):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/single_gpu_speed.py --no-loose-logs
Rows the --budget leaves out are listed as skipped: run them in a second command with --only.

Writes ``single_gpu_speed.md`` (the table), ``single_gpu_speed.json`` (every number, the environment) and
``single_gpu_speed_logs.tar.gz`` (all logs) to ``--out`` (default $OUT, else ./benchmark_out), rewritten
after every row so that a run cut short still leaves its results. The loose logs go to ``--out``/logs;
``--no-loose-logs`` keeps them in the work folder only (the GPU machine returns at most 8 files).
"""

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Tuple

from speed_baseline import baseline_row, baseline_variants, run_baseline
from speed_inputs import write_dataset, write_model_folder
from speed_logs import TAIL_LINES, failure_excerpt, last_loss, read_speed_log, summarize_speed_log
from speed_models import (
    LORA_CONFIG,
    MODEL_A,
    MODEL_B,
    PEAK_DATASHEET,
    SEQ,
    TINY_MODEL_A,
    TINY_MODEL_B,
    TINY_SEQ,
    flops_per_token,
    linear_params,
    lora_params,
    measured_matmul,
    mfu,
)
from speed_processes import RUN_SH, free_port, run_logged
from speed_report import render_table
from speed_rows import LEARNING_RATE, MIN_START_S, ROW_KEYS, SAMPLES_PER_PACKED_ROW, VARIANTS, check_rows


class Benchmark:
    """One invocation: the HF baseline, then our rows one by one, the outputs rewritten after each."""

    def __init__(self, args, rows: List[dict]):
        self.args = args
        self.rows = rows
        self.seq = TINY_SEQ if args.tiny else SEQ
        self.shapes = {"A": TINY_MODEL_A, "B": TINY_MODEL_B} if args.tiny else {"A": MODEL_A, "B": MODEL_B}
        self.out = args.out
        self.work = args.work
        self.logs = (self.work if args.no_loose_logs else self.out) / "logs"
        self.start = time.time()
        self.baseline: dict = {}
        self.baseline_status = "not run"
        self.results: List[dict] = []
        self._datasets: Dict[Tuple[int, str], Path] = {}
        self._models: Dict[str, Path] = {}
        # Each (vocab, data kind) dataset holds enough rows for the longest row that uses it, in one epoch
        # (a packed row takes about two samples of the varlen data).
        self._rows_needed: Dict[Tuple[int, str], int] = {}
        for row in rows:
            key = (self.shapes[row["model"]]["vocab_size"], row["data"])
            need = ((self.warmup(row) + args.steps) * row["mb"] * row["accu"] + row["mb"]) * (
                SAMPLES_PER_PACKED_ROW[row["data"]] if row["pack"] else 1
            )
            self._rows_needed[key] = max(self._rows_needed.get(key, 0), need)

    def remaining(self) -> float:
        return self.args.budget - (time.time() - self.start)

    def warmup(self, row: dict) -> int:
        return self.args.compile_warmup if row["compile"] else self.args.warmup

    def log(self, message: str) -> None:
        print(f"[single_gpu_speed {time.time() - self.start:6.0f}s] {message}", flush=True)

    # ---- the Hugging Face side ----
    def run_baseline(self) -> None:
        variants = baseline_variants(self.rows)
        folder = self.logs / "baseline"
        budget = min(self.args.baseline_budget, self.remaining())
        self.baseline, self.baseline_status = run_baseline(
            variants, folder, budget, self.args.steps, self.args.tiny, self.log
        )
        for variant in variants:
            self.results.append(baseline_row(variant, self.baseline, self.baseline_status, folder / "stdout.log"))

    # ---- our side ----
    def model_folder(self, model: str) -> Path:
        if model not in self._models:
            self._models[model] = write_model_folder(self.work / "models" / model, self.shapes[model], self.seq)
        return self._models[model]

    def dataset(self, vocab: int, kind: str = "fixed") -> Path:
        key = (vocab, kind)
        if key not in self._datasets:
            folder = self.work / "data" / f"random_v{vocab}_s{self.seq}_{kind}"
            self._datasets[key] = write_dataset(folder, vocab, self.seq, self._rows_needed[key], kind=kind)
        return self._datasets[key]

    def run_row(self, row: dict) -> dict:
        shape = self.shapes[row["model"]]
        warmup = self.warmup(row)
        result = dict(
            name=row["name"],
            source="ours",
            model=row["model"],
            mode=row["mode"],
            mb=row["mb"],
            precision=row["precision"],
            compile=row["compile"],
            recompute=row["recompute"],
            data=row["data"],
            pack=row["pack"],
            zero=row["zero"],
            accu=row["accu"],
            in_backward=row.get("in_backward"),
            states=row.get("states"),
            warmup=warmup,
            steps=self.args.steps,
            log=f"logs/{row['name']}.log",
        )
        left = self.remaining()
        need = MIN_START_S[int(bool(row["compile"]))]
        if left < need:
            self.log(f"SKIP {row['name']}: {left:.0f} s of the {self.args.budget:.0f} s budget left, it needs {need}")
            return dict(result, status="skipped", reason=f"out of time budget ({left:.0f} s left, needs {need} s)")
        timeout = min(row["timeout"], left)
        run_dir = self.work / "runs" / row["name"]
        shutil.rmtree(run_dir, ignore_errors=True)  # the speed log appends: start from nothing
        speed_log = run_dir / "speed.jsonl"
        settings = dict(
            MODEL_ARCH="hf_auto_causal_lm",
            HUGGINGFACE_MODEL_NAME_OR_PATH=str(self.model_folder(row["model"])),
            DATASET_TYPE="disk",
            DATASET_PATH=str(self.dataset(shape["vocab_size"], row["data"])),
            SEQUENCE_LENGTH=str(self.seq),
            BATCH_SIZE=str(row["mb"]),
            GRADIENT_ACCU_NUM=str(row["accu"]),
            MAX_STEPS=str(warmup + self.args.steps),
            WARMUP_STEPS="0",
            LEARNING_RATE=LEARNING_RATE[row["mode"]],
            LOG_INTERVAL="10",
            LOG_FORMAT="json",
            EVALUATE="0",
            OUTPUT_DIR=str(run_dir),
            PRECISION=row["precision"],
            COMPILE=str(row["compile"]),
            USE_LORA="1" if row["mode"] == "lora" else "0",
            LORA_CONFIG=LORA_CONFIG if row["mode"] == "lora" else "",
            RECOMPUTE_MODULE_NAMES=row["recompute"],
            SPEED_LOG=str(speed_log),
            SEED="1",
            PACK_SEQUENCES=str(int(bool(row["pack"]))),
            NPROC_PER_NODE="1",
            NNODES="1",
            NODE_RANK="0",
            PLAN_NGPUS="1",
            USE_ZERO=str(row["zero"]),
            PLAN_FILE="",
            CUBE_SCALING_FACTOR="",
            MASTER_PORT=str(free_port()),
        )
        if row.get("in_backward") is not None:
            settings.update(CLIP_NORM="0", OPTIMIZER_IN_BACKWARD=str(row["in_backward"]))
        if row.get("states"):
            settings.update(OPTIMIZER_STATES=row["states"])
        env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", **settings)
        cmd = ["bash", str(RUN_SH), "--no-save", "--disable-validation", *row.get("args", [])]
        header = "".join(f"# {k}={v}\n" for k, v in settings.items()) + f"# {' '.join(cmd)}\n"
        log = self.logs / f"{row['name']}.log"
        if row.get("mem_per_gpu"):
            planned = self.compile_plan(row, env, run_dir)
            if "plan_file" not in planned:
                return dict(result, status="failed", **planned)
            result.update(planned)
            env.update(PLAN_FILE=planned["plan_file"], RECOMPUTE_MODULE_NAMES="")
        self.log(f"START {row['name']} (timeout {timeout:.0f} s)")
        run = run_logged(cmd, env, log, timeout, header)
        result.update(rc=run["rc"], wall_s=round(run["wall_s"], 1))
        if speed_log.is_file():
            shutil.copy(speed_log, self.logs / f"{row['name']}.speed.jsonl")
        result["loss_last"] = last_loss(log)
        if run["timed_out"]:
            result.update(status="failed", reason=f"timed out after {timeout:.0f} s")
        elif run["rc"] != 0:
            result.update(status="failed", reason=f"run.sh exited with {run['rc']}")
        elif not speed_log.is_file():
            result.update(status="failed", reason="run.sh wrote no SPEED_LOG (does this run.sh support SPEED_LOG?)")
        if result.get("status") is None:
            try:
                result.update(summarize_speed_log(read_speed_log(speed_log), warmup), status="ok")
            except (ValueError, KeyError, TypeError, ZeroDivisionError) as err:
                result.update(status="failed", reason=f"speed log unusable: {type(err).__name__}: {err}")
        if result["status"] != "ok":
            error, result["tail"] = failure_excerpt(log, at_error=not run["timed_out"])
            if error:
                result["reason"] += f": {error}"
            self.log(f"FAILED {row['name']}: {result['reason']}")
            return result
        if result["timed_updates"] < self.args.steps:
            result["note"] = f"only {result['timed_updates']} of {self.args.steps} timed updates logged"
        fpt = flops_per_token(shape, row["mode"], self.seq)
        result.update(
            flops_per_token=fpt,
            n_linear=linear_params(shape),
            n_lora=lora_params(shape) if row["mode"] == "lora" else 0,
            mfu_989=mfu(fpt, result["tokens_per_s"], PEAK_DATASHEET),
            mfu_measured=mfu(fpt, result["tokens_per_s"], measured_matmul(self.baseline)),
        )
        if row["data"] != "fixed" and result.get("trained_tokens_per_s"):
            result["note"] = "; ".join(
                filter(
                    None,
                    [
                        result.get("note"),
                        (
                            f"{row['data']} data{', packed' if row['pack'] else ', padded'}: "
                            f"{result['trained_tokens_per_s']:,.0f} trained tokens/s"
                        ),
                    ],
                )
            )
        self.log(f"END {row['name']}: {result['tokens_per_s']:,.0f} tokens/s in {run['wall_s']:.0f} s")
        return result

    def compile_plan(self, row: dict, env: dict, run_dir: Path) -> dict:
        """``run.sh compile`` for the row's settings and MEM_PER_GPU: the plan file and its predictions."""
        log = self.logs / f"{row['name']}.plan.log"
        run = run_logged(
            ["bash", str(RUN_SH), "compile"],
            dict(env, MEM_PER_GPU=str(row["mem_per_gpu"]), RECOMPUTE_MODULE_NAMES=""),
            log,
            180,
        )
        plan_file = run_dir / "plan.json"
        text = log.read_text()
        if run["rc"] != 0 or not plan_file.is_file():
            return dict(reason=f"run.sh compile failed (rc {run['rc']})", tail=text.splitlines()[-TAIL_LINES:])
        chosen = re.search(r"chosen plan: (.*?); peak memory ([\d.]+) GB.*?step ([\d.]+) s", text)
        tensors = re.search(r"chosen plan: .*?; peak memory [\d.]+ GB \(tensors ([\d.]+)", text)
        planned = dict(plan_file=str(plan_file), plan=json.loads(plan_file.read_text()))
        if chosen:
            planned.update(
                plan_summary=chosen.group(1),
                predicted_peak_gib=float(chosen.group(2)),
                predicted_step_s=float(chosen.group(3)),
            )
        if tensors:  # comparable with the measured peak_alloc_gib (torch.cuda.max_memory_allocated)
            planned.update(predicted_alloc_gib=float(tensors.group(1)))
        self.log(f"PLAN {row['name']}: {planned.get('plan_summary')} (MEM_PER_GPU {row['mem_per_gpu']})")
        return planned

    def compare(self) -> None:
        """Ratio of our tokens/s to the HF row of the same model, mode and data (variable-length data: trained
        tokens/s against HF's batches grouped by length); flag a FLOP count that differs."""
        hf = {
            (r["model"], r["mode"], r["data"]): r
            for r in self.results
            if r["source"] == "hf" and r["status"] == "ok" and not r["name"].endswith("_random")
        }
        for r in self.results:
            ref = hf.get((r["model"], r["mode"], r.get("data", "fixed")))
            if r["source"] != "ours" or r["status"] != "ok" or ref is None:
                continue
            ours = r["tokens_per_s"] if r["data"] == "fixed" else r.get("trained_tokens_per_s")
            if ours is None:
                continue
            r["ratio_to_hf"] = ours / ref["tokens_per_s"]
            r.setdefault("own_note", r.get("note", ""))  # compare() runs after every row: notes are rebuilt
            notes = [r["own_note"]] if r["own_note"] else []
            if ref["mb"] != r["mb"]:
                notes.append(f"HF ran micro-batch {ref['mb']}")
            if abs(ref["flops_per_token"] - r["flops_per_token"]) > 1e-6 * r["flops_per_token"]:
                notes.append(f"FLOP count differs from HF's ({ref['flops_per_token']:.4g})")
            if notes:
                r["note"] = "; ".join(notes)

    # ---- outputs ----
    def environment(self) -> dict:
        env = dict((self.baseline.get("env_matmul") or {}).get("env") or {})
        driver = {"python": sys.version.split()[0]}
        for dist in ("torch", "transformers", "peft", "datasets", "ve-fairseq", "fairseq", "accelerate"):
            try:
                driver[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        if "gpu" not in env:
            try:
                smi = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                names = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
                env["gpu"] = names[0] if names else "none"
            except (OSError, subprocess.TimeoutExpired):
                env["gpu"] = "none"
        return {"baseline_env": env, "driver_versions": driver}

    def write(self) -> None:
        self.compare()
        environment = self.environment()
        table = render_table(self.results, environment, self.baseline, self.settings())
        (self.out / "single_gpu_speed.md").write_text(table + "\n")
        numbers = dict(
            settings=self.settings(),
            environment=environment,
            matmul_bf16_flops=(self.baseline.get("env_matmul") or {}).get("matmul_bf16_flops"),
            matmul_bf16_flops_end=(self.baseline.get("matmul_end") or {}).get("matmul_bf16_flops"),
            baseline_status=self.baseline_status,
            rows=self.results,
            baseline=self.baseline,
        )
        (self.out / "single_gpu_speed.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
        with tarfile.open(self.out / "single_gpu_speed_logs.tar.gz", "w:gz") as tar:
            if self.logs.is_dir():
                tar.add(self.logs, arcname="logs")

    def settings(self) -> dict:
        return dict(
            tiny=self.args.tiny,
            seq=self.seq,
            steps=self.args.steps,
            warmup=self.args.warmup,
            compile_warmup=self.args.compile_warmup,
            budget_s=self.args.budget,
            elapsed_s=round(time.time() - self.start, 1),
            peak_datasheet=PEAK_DATASHEET,
            shapes=self.shapes,
            lora_config=LORA_CONFIG,
            rows=self.rows,
        )

    def main(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.args.skip_baseline:
            self.run_baseline()
            self.write()
        for row in self.rows:
            try:
                result = self.run_row(row)
            except Exception as err:  # a broken row (e.g. its data could not be written) never stops the others
                result = dict(
                    name=row["name"],
                    source="ours",
                    model=row["model"],
                    mode=row["mode"],
                    mb=row["mb"],
                    precision=row["precision"],
                    compile=row["compile"],
                    recompute=row["recompute"],
                    status="failed",
                    reason=f"{type(err).__name__}: {err}",
                    tail=traceback.format_exc(),
                )
                self.log(f"FAILED {row['name']}: {result['reason']}")
            self.results.append(result)
            self.write()
        print(render_table(self.results, self.environment(), self.baseline, self.settings()), flush=True)
        ours = [r for r in self.results if r["source"] == "ours"]
        return 0 if all(r["status"] == "ok" for r in ours) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or "benchmark_out"),
        help="results folder (default $OUT, else ./benchmark_out)",
    )
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument(
        "--variants",
        type=Path,
        help=f"a JSON list of row dicts that replaces the built-in rows (keys: {', '.join(sorted(ROW_KEYS))})",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny models and seq 128, as hf_baseline.py ANCHOR_TINY=1 (a CPU smoke run of the whole script)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed updates per row (also the baseline's)")
    parser.add_argument("--warmup", type=int, default=5, help="updates dropped before timing")
    parser.add_argument("--compile-warmup", type=int, default=8, help="updates dropped before timing, COMPILE=1 rows")
    parser.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds for everything; rows that would start past it are skipped, and reported so",
    )
    parser.add_argument(
        "--baseline-budget",
        type=float,
        default=300,
        help="at most this many seconds of --budget for the HF baseline (its ANCHOR_BUDGET_S)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="no HF rows, no measured matmul rate")
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch folder for models, data and runs (default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--no-loose-logs",
        action="store_true",
        help="keep row logs only in the tar.gz (the GPU machine returns at most 8 files)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.compile_warmup < 0:
        parser.error("--steps must be positive, --warmup and --compile-warmup non-negative")
    rows = json.loads(args.variants.read_text()) if args.variants else VARIANTS
    try:
        rows = check_rows(rows)
    except ValueError as err:
        parser.error(str(err))
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in {r["name"] for r in rows}]
        if unknown:
            parser.error(f"--only: unknown rows {unknown}; the rows are: {', '.join(r['name'] for r in rows)}")
        rows = [r for r in rows if r["name"] in wanted]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="single_gpu_speed_")) if temporary else args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        return Benchmark(args, rows).main()
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
