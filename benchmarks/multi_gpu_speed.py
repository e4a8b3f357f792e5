"""Speed on several GPUs: a full finetune through run.sh with the compile pass's plan against FSDP2 alone.

Both sides train the same Llama config (random weights) on random token ids with the same global batch
(``--mb`` sequences per GPU per update), in the same invocation on the same GPUs:

- ours: ``run.sh compile`` searches the plan for ``--gpus`` scale units of one GPU (PLAN_NGPUS=1,
  CUBE_SCALING_FACTOR=gpus, PRECISION, COMPILE, MEM_PER_GPU; USE_ZERO as ``--zero`` gives it, or unset so
  that the compile pass chooses the ZeRO level), then ``run.sh`` trains with it (fairseq-train under
  torchrun; SPEED_LOG gives CUDA-event step times and peak memory of rank 0);
- baseline: ``benchmarks/baseline/fsdp2_baseline.py`` (torch ``fully_shard`` per layer, bf16 compute,
  float32 master weights and reduction, fused AdamW, optionally ``torch.compile`` per layer).

Reported: tokens/s per GPU, MFU (6N + attention FLOPs, as ``single_gpu_speed.py`` counts them, over 989
TFLOP/s and over the bf16 matmul rate the baseline measured), peak memory, and for ours the compile pass's
predicted peak and step time next to the measured ones.

    python benchmarks/multi_gpu_speed.py --gpus 2 --shape 8B --seq 4096 --mb 1 --mem-per-gpu 120 --out $OUT
    python benchmarks/multi_gpu_speed.py --gpus 2,4,8 --shape 8B --mem-per-gpu 70 --out $OUT   # one table per count
    python benchmarks/multi_gpu_speed.py --tiny --gpus 2 --out /tmp/mgs      # CPU smoke run (gloo, fp32)

With several counts each runs in its own folder ``$OUT/<n>gpus`` and ``$OUT/multi_gpu_speed.md`` holds all tables.

NVLink multicast stays off in every launch (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1), as the lent multi-GPU machines require.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_inputs import write_dataset, write_model_folder  # noqa: E402
from speed_logs import failure_excerpt, read_speed_log, summarize_speed_log  # noqa: E402
from speed_models import MODEL_A, MODEL_B, PEAK_DATASHEET, TINY_MODEL_A, flops_per_token, mfu  # noqa: E402
from speed_processes import REPO, RUN_SH, free_port, run_logged  # noqa: E402

FSDP2 = REPO / "benchmarks" / "baseline" / "fsdp2_baseline.py"
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SHAPES = {
    "8B": MODEL_B,
    "1.1B": MODEL_A,
    "tiny": dict(TINY_MODEL_A, vocab_size=512, max_position_embeddings=256),
}


def run_fsdp2(args, work: Path, env: dict) -> dict:
    """The FSDP2 baseline under torchrun; its result JSON, or {'status': 'failed', ...}."""
    out = work / "fsdp2.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(args.gpus),
        "--master-port",
        str(free_port()),
        str(FSDP2),
        "--shape",
        args.shape,
        "--seq",
        str(args.seq),
        "--mb",
        str(args.mb),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--out",
        str(out),
    ]
    cmd += ["--compile"] if args.fsdp2_compile else []
    cmd += ["--checkpoint"] if args.fsdp2_checkpoint else []
    run = run_logged(cmd, env, args.out / "fsdp2.log", args.timeout)
    if run["rc"] != 0 or not out.is_file():
        return dict(
            status="failed",
            reason=f"rc {run['rc']}{' (timed out)' if run['timed_out'] else ''}",
            error=failure_excerpt(args.out / "fsdp2.log")[0],
        )
    return dict(json.loads(out.read_text()), status="ok", wall_s=run["wall_s"])


def ours_settings(args, model: Path, data: Path, speed_log: Path, output_dir: Path) -> dict:
    """run.sh's variables for our run on ``args.gpus`` GPUs: scale units of one GPU, the global batch of the
    baseline (``--mb`` per GPU per update), USE_ZERO only where ``--zero`` fixes it."""
    settings = dict(
        MODEL_ARCH="hf_auto_causal_lm",
        HUGGINGFACE_MODEL_NAME_OR_PATH=str(model),
        DATASET_TYPE="disk",
        DATASET_PATH=str(data),
        SEQUENCE_LENGTH=str(args.seq),
        BATCH_SIZE=str(args.mb),
        GRADIENT_ACCU_NUM="1",
        MAX_STEPS=str(args.warmup + args.steps),
        WARMUP_STEPS="0",
        LEARNING_RATE="1e-5",
        LOG_INTERVAL="10",
        LOG_FORMAT="json",
        EVALUATE="0",
        OUTPUT_DIR=str(output_dir),
        PRECISION=args.precision,
        COMPILE=str(int(args.compile)),
        USE_LORA="0",
        SPEED_LOG=str(speed_log),
        SEED="1",
        NPROC_PER_NODE=str(args.gpus),
        NNODES="1",
        NODE_RANK="0",
        PLAN_NGPUS="1",
        CUBE_SCALING_FACTOR=str(args.gpus),
        MEM_PER_GPU=str(args.mem_per_gpu),
        MASTER_PORT=str(free_port()),
    )
    if args.zero != "auto":
        settings["USE_ZERO"] = args.zero
    return settings


def predictions(report: str) -> dict:
    """The chosen plan's summary, predicted peak GiB and step seconds from ``run.sh compile``'s report."""
    chosen = re.search(r"chosen plan: (.*?); peak memory ([\d.]+) GB.*?; step ([\d.]+) s", report)
    if not chosen:
        return {}
    return dict(
        plan_summary=chosen.group(1), predicted_peak_gib=float(chosen.group(2)), predicted_step_s=float(chosen.group(3))
    )


def run_ours(args, work: Path, env: dict, extra: str = "", name: str = "ours") -> dict:
    """``run.sh compile`` then ``run.sh`` with the plan (``extra``: more fairseq-train arguments); the speed log's
    summary and the plan's predictions."""
    shape = SHAPES[args.shape]
    model = write_model_folder(work / "model", shape, args.seq)
    rows = (args.warmup + args.steps + 1) * args.mb * args.gpus
    data = write_dataset(work / "data", shape["vocab_size"], args.seq, rows)
    speed_log = work / f"{name}_speed.jsonl"
    settings = ours_settings(args, model, data, speed_log, work / name)
    inherited = {k: v for k, v in env.items() if k not in ("USE_ZERO", "ZERO_N_GROUPS")}  # the search's, unless --zero
    env = dict(inherited, PYTHON=sys.executable, **settings)
    result = dict(
        settings={k: v for k, v in settings.items() if k not in ("DATASET_PATH", "OUTPUT_DIR")}, extra_args=extra
    )
    compiled = run_logged(["bash", str(RUN_SH), "compile"], env, args.out / f"{name}_compile.log", 300)
    plan_file = work / name / "plan.json"
    if compiled["rc"] != 0 or not plan_file.is_file():
        return dict(
            result,
            status="failed",
            reason="run.sh compile failed",
            error=failure_excerpt(args.out / f"{name}_compile.log")[0],
        )
    result.update(predictions((args.out / f"{name}_compile.log").read_text()))
    result["plan"] = json.loads(plan_file.read_text())
    cmd = ["bash", str(RUN_SH), "--no-save", "--disable-validation", *extra.split()]
    run = run_logged(cmd, dict(env, PLAN_FILE=str(plan_file)), args.out / f"{name}.log", args.timeout)
    if run["rc"] != 0 or not speed_log.is_file():
        return dict(
            result,
            status="failed",
            reason=f"run.sh rc {run['rc']}{' (timed out)' if run['timed_out'] else ''}",
            error=failure_excerpt(args.out / f"{name}.log")[0],
        )
    summary = summarize_speed_log(read_speed_log(speed_log), args.warmup)
    return dict(
        result,
        status="ok",
        wall_s=run["wall_s"],
        step_median_s=summary["step_median_s"],
        tokens_per_s_per_gpu=summary["tokens_per_s"],
        peak_alloc_gib=summary["peak_alloc_gib"],
        peak_reserved_gib=summary["peak_reserved_gib"],
        bookkeeping_share=summary["bookkeeping_share"],
    )


def table(args, fsdp2: dict, ours_runs: list) -> str:
    shape = SHAPES[args.shape]
    fpt = flops_per_token(shape, "full", args.seq)
    rate = fsdp2.get("matmul_bf16_flops")
    lines = [
        f"# {args.shape} full finetune on {args.gpus} GPUs, seq {args.seq}, {args.mb} sequence(s) per GPU per update",
        "",
        f"GPU {fsdp2.get('gpu', '?')}; bf16 matmul {rate / 1e12:.1f} TFLOP/s" if rate else "",
        "",
        "| run | tokens/s per GPU | MFU vs 989 | MFU vs matmul | peak GiB (allocated) | step s | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [
        (
            "FSDP2 fully_shard"
            + (" + compile" if args.fsdp2_compile else "")
            + (" + checkpointing" if args.fsdp2_checkpoint else ""),
            fsdp2,
        )
    ]
    rows += [
        (
            f"ours: run.sh, PRECISION={args.precision} COMPILE={int(args.compile)}, compile-pass plan"
            + (f", `{r['extra_args']}`" if r.get("extra_args") else ""),
            r,
        )
        for r in ours_runs
    ]
    for name, r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {name} | failed | - | - | - | - | {r.get('reason', '')}: {r.get('error', '')} |")
            continue
        tps = r["tokens_per_s_per_gpu"]
        note = ""
        if "predicted_peak_gib" in r:
            note = (
                f"plan {r['plan_summary']}; predicted peak {r['predicted_peak_gib']:.1f} GiB (with slack), "
                f"step {r['predicted_step_s']:.3f} s; reserved {r['peak_reserved_gib'] or 0:.1f} GiB"
            )
        lines.append(
            f"| {name} | {tps:,.0f} | {mfu(fpt, tps, PEAK_DATASHEET):.1%} | "
            f"{mfu(fpt, tps, rate) or 0:.1%} | {r['peak_alloc_gib'] or 0:.1f} | {r['step_median_s']:.3f} | {note} |"
        )
    return "\n".join(lines) + "\n"


def gpu_counts(text: str) -> list:
    """``--gpus``: one count or several, comma separated (2,4,8)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError(f"--gpus must be GPU counts separated by commas (e.g. 2,4,8), got {text!r}")
    return counts


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; ``--tiny`` replaces the shape, sequence length, precision and compile settings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=gpu_counts, default=[2], help="GPU count(s) of the runs, e.g. 2,4,8")
    parser.add_argument(
        "--zero",
        choices=("auto", "0", "1", "2", "3"),
        default="auto",
        help="USE_ZERO of our runs; auto: unset, the compile pass chooses the level",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8B")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--mb", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--precision", default="bf16-master")
    parser.add_argument("--compile", type=int, choices=(0, 1), default=1)
    parser.add_argument("--mem-per-gpu", type=float, default=110)
    parser.add_argument("--fsdp2-compile", type=int, choices=(0, 1), default=1)
    parser.add_argument("--fsdp2-checkpoint", type=int, choices=(0, 1), default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for each training run")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, seq 64, fp32, no compile")
    parser.add_argument(
        "--ours-args",
        action="append",
        default=None,
        metavar="ARGS",
        help="more fairseq-train arguments for our run, e.g. --ours-args=--gradient-as-bucket-view; "
        "repeat for several runs of ours ('' = none; default: one run without)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape, args.seq, args.precision, args.compile, args.fsdp2_compile = "tiny", 64, "fp32", 0, 0
    return args


def runs_of(args) -> list:
    """One set of arguments per GPU count: its own ``gpus`` and, with several counts, its own folder."""
    several = len(args.gpus) > 1
    return [
        argparse.Namespace(**{**vars(args), "gpus": n, "out": args.out / f"{n}gpus" if several else args.out})
        for n in args.gpus
    ]


def run_one(args, env: dict) -> str:
    """The baseline and our runs on ``args.gpus`` GPUs; writes their table and JSON into ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="multi_gpu_speed_"))
    try:
        fsdp2 = run_fsdp2(args, work, env)
        ours = [
            run_ours(args, work, env, extra, "ours" + (f"{i}" if i else ""))
            for i, extra in enumerate(args.ours_args or [""])
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(args, fsdp2, ours)
    (args.out / "multi_gpu_speed.md").write_text(text)
    (args.out / "multi_gpu_speed.json").write_text(
        json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, fsdp2=fsdp2, ours=ours), indent=1)
    )
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **NCCL_ENV)
    texts = []
    for run in runs_of(args):
        texts.append(run_one(run, env))
        print(texts[-1], flush=True)
    if len(texts) > 1:
        (args.out / "multi_gpu_speed.md").write_text("\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
