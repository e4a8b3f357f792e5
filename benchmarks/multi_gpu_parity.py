"""bf16 loss parity of parallel plans on several GPUs (NCCL) against one GPU, through run.sh.

Each plan trains the same model on the same data order and global batch for ``--steps`` updates
(PRECISION=bf16 by default); the per-update losses (full precision: ``exact_loss`` of the tests' --user-dir tests/assets/exact_loss)
are written to ``losses.csv`` and compared with the one-GPU run of the same global batch in
``parity.md``. Plans on 2 scale units compare with one GPU accumulating 2 micro-batches.

    python benchmarks/multi_gpu_parity.py --out benchmarks/results/multi_gpu_parity [--steps 100] [--gpus 4]

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1),
as the lent multi-GPU machines require.
"""

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "cube_examples" / "finetune_hf_model" / "run.sh"
TINY_LLAMA = REPO / "cube_examples" / "finetune_hf_model" / "model" / "tiny-llama"
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# name -> (processes, accumulation of the one-GPU reference, run.sh variables, plan JSON or None); the plan
# itself runs without accumulation: its scale units together take the reference's accumulated batch.
PLANS = {
    "dp2": (2, 2, {}, None),
    "tp2": (2, 1, {"PLAN_NGPUS": "2"}, None),
    "pp2_1f1b": (2, 1, {}, dict(plan_ngpus=2, scaling_factor=1, tp=1, pp=2, pp_schedule="1F1B", num_microbatches=2)),
    "pp2_interleaved": (
        2,
        1,
        {},
        dict(
            plan_ngpus=2,
            scaling_factor=1,
            tp=1,
            pp=2,
            pp_schedule="Interleaved1F1B",
            num_microbatches=2,
            virtual_stages_per_rank=2,
        ),
    ),
    "tp2_pp2": (4, 1, {}, dict(plan_ngpus=4, scaling_factor=1, tp=2, pp=2, pp_schedule="1F1B", num_microbatches=2)),
    "tp2_x2units": (4, 2, {"PLAN_NGPUS": "2"}, None),
    "tp2_x2units_zero": (4, 2, {"PLAN_NGPUS": "2", "USE_ZERO": "1"}, None),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def four_layer_model(folder: Path) -> Path:
    """The shipped tiny Llama with 4 decoder layers (interleaved pipelines need 2 stages per rank)."""
    shutil.copytree(TINY_LLAMA, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def losses_of(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if "| train_inner |" in line:
            record = json.loads(line.split("| train_inner |", 1)[1])
            out[int(record["num_updates"])] = float(record["exact_loss"])
    return out


def train(name: str, nproc: int, accumulation: int, variables: dict, out: Path, args) -> dict:
    """Run run.sh once; return {'losses', 'wall', 'rc'}; stdout/stderr kept in out/name.log."""
    settings = dict(
        os.environ,
        **NCCL_ENV,
        PYTHON=sys.executable,
        OUTPUT_DIR=str(out / "runs" / name),
        MASTER_PORT=str(free_port()),
        NPROC_PER_NODE=str(nproc),
        GRADIENT_ACCU_NUM=str(accumulation),
        HUGGINGFACE_MODEL_NAME_OR_PATH=str(args.model),
        MAX_STEPS=str(args.steps),
        SAVE_STEPS=str(args.steps),
        WARMUP_STEPS="10",
        BATCH_SIZE=str(args.batch_size),
        SEQUENCE_LENGTH="128",
        PRECISION=args.precision,
        USER_DIR=str(REPO / "tests" / "assets" / "exact_loss"),
        EVALUATE="0",
        LOG_FORMAT="json",
        LOG_INTERVAL="1",
        **variables,
    )
    start = time.time()
    result = subprocess.run(["bash", str(RUN_SH)], capture_output=True, text=True, env=settings)
    (out / f"{name}.log").write_text(result.stdout[-20000:] + "\n---- stderr ----\n" + result.stderr[-20000:])
    return {"losses": losses_of(result.stdout), "wall": time.time() - start, "rc": result.returncode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--gpus", type=int, default=4, help="GPUs available: plans needing more are skipped")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--plans", default=",".join(PLANS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model = four_layer_model(args.out / "tiny-llama-4l")
    results = {}
    for accumulation in sorted({PLANS[p][1] for p in args.plans.split(",")}):
        results[f"1gpu_accu{accumulation}"] = train(f"1gpu_accu{accumulation}", 1, accumulation, {}, args.out, args)
    for name in args.plans.split(","):
        nproc, accumulation, variables, plan = PLANS[name]
        if nproc > args.gpus:
            continue
        if plan is not None:
            plan_file = args.out / f"{name}.plan.json"
            plan_file.write_text(json.dumps(plan))
            variables = dict(variables, PLAN_FILE=str(plan_file))
        results[name] = train(name, nproc, 1, variables, args.out, args)
        results[name]["reference"] = f"1gpu_accu{accumulation}"
    write_tables(results, args)
    return 0


def write_tables(results: dict, args) -> None:
    names = list(results)
    with open(args.out / "losses.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *names])
        for step in range(1, args.steps + 1):
            writer.writerow([step, *[results[n]["losses"].get(step, "") for n in names]])
    lines = [
        f"# bf16 parity over {args.steps} updates (precision {args.precision}, batch {args.batch_size} per "
        "scale unit, 4-layer tiny Llama)",
        "",
        "| plan | rc | wall s | reference | max abs loss diff | mean abs loss diff | final loss | reference final |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        ref = results.get(r.get("reference", ""), {}).get("losses", {})
        steps = sorted(set(r["losses"]) & set(ref))
        diffs = [abs(r["losses"][s] - ref[s]) for s in steps]
        last = r["losses"].get(args.steps, float("nan"))
        lines.append(
            f"| {name} | {r['rc']} | {r['wall']:.0f} | {r.get('reference', '-')} | "
            f"{max(diffs) if diffs else float('nan'):.4f} | "
            f"{sum(diffs) / len(diffs) if diffs else float('nan'):.4f} | {last:.4f} | "
            f"{ref.get(args.steps, float('nan')):.4f} |"
        )
    (args.out / "parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
