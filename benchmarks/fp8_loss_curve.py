"""Loss curves of PRECISION=fp8 against bf16-master: the 1.1B Llama (benchmarks/single_gpu_speed.py's MODEL_A,
random initial weights under one seed) trained from scratch on real text through run.sh, both runs on one GPU
at the same time, same data order, per-update losses compared.

The text is the Python source of the installed torch package (sorted files, concatenated), one token per
byte (ids = byte + 3, under the tokenizer's pad/bos/eos ids), cut into rows of ``--seq`` tokens: real text
with its structure, no tokenizer or download needed.

    python benchmarks/fp8_loss_curve.py --out DIR [--work DIR] [--steps 320] [--seq 1024] [--batch-size 4]
    python benchmarks/fp8_loss_curve.py --out DIR --tiny --precisions fp32,bf16-master --compile 0 --steps 30 \
        --seq 64   # CPU smoke run

Writes DIR/losses.csv (update, one column per precision), DIR/fp8_loss_curve.md (the comparison against the
tolerance below) and DIR/fp8_loss_curve.png (needs matplotlib; skipped without it); the model, data and one log
per run go to the work folder (default DIR/work).

Tolerance: after the first ``WINDOW`` updates, the moving averages over ``WINDOW`` updates of the two curves
differ by at most ``MAX_RELATIVE`` of bf16-master's; the means of the last ``WINDOW`` updates by at most
``FINAL_RELATIVE``.
"""

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu_parity import losses_of  # noqa: E402
from single_gpu_speed import MODEL_A, REPO, RUN_SH, TINY_MODEL_A, free_port, write_model_folder  # noqa: E402

WINDOW = 20
MAX_RELATIVE = 0.03
FINAL_RELATIVE = 0.01
BYTE_OFFSET = 3  # ids 0-2: the tokenizer's pad/bos/eos


def text_rows(root: Path, seq: int, rows: int) -> List[List[int]]:
    """``rows`` rows of ``seq`` byte ids from the sorted ``*.py`` files under ``root``."""
    ids: List[int] = []
    for path in sorted(root.rglob("*.py")):
        ids.extend(b + BYTE_OFFSET for b in path.read_bytes())
        if len(ids) >= seq * rows:
            break
    if len(ids) < seq * rows:
        raise SystemExit(f"{root} holds {len(ids)} bytes of Python, {seq * rows} are needed")
    return [ids[i * seq : (i + 1) * seq] for i in range(rows)]


def write_text_dataset(folder: Path, root: Path, seq: int, train_rows: int) -> Path:
    import datasets

    rows = text_rows(root, seq, train_rows + 8)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_ids": rows[:train_rows]}),
            "valid": datasets.Dataset.from_dict({"input_ids": rows[train_rows:]}),
        }
    ).save_to_disk(str(folder))
    return folder


def moving_average(values: List[float], window: int) -> List[float]:
    return [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]


def compare(reference: List[float], other: List[float], window: int = WINDOW) -> Dict[str, float]:
    """The two figures the tolerance bounds: the largest relative gap of the moving averages, and of the
    final window's means."""
    ref_avg, other_avg = moving_average(reference, window), moving_average(other, window)
    gaps = [abs(o - r) / abs(r) for r, o in zip(ref_avg, other_avg)]
    final_ref, final_other = sum(reference[-window:]) / window, sum(other[-window:]) / window
    return dict(
        max_moving_gap=max(gaps),
        final_gap=abs(final_other - final_ref) / abs(final_ref),
        final_reference=final_ref,
        final_other=final_other,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", default="2e-4")
    parser.add_argument("--precisions", default="bf16-master,fp8")
    parser.add_argument("--text-root", type=Path, default=None, help="default: the installed torch package")
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a two-layer model: a CPU smoke run of the script")
    parser.add_argument("--compile", default="1", help="run.sh COMPILE")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    if args.text_root is None:
        import torch

        args.text_root = Path(torch.__file__).parent
    model = write_model_folder(work / "model", TINY_MODEL_A if args.tiny else MODEL_A, args.seq)
    data = write_text_dataset(work / "data", args.text_root, args.seq, args.steps * args.batch_size + args.batch_size)
    precisions = args.precisions.split(",")
    runs = {}
    for precision in precisions:
        env = dict(
            os.environ,
            PYTHON=sys.executable,
            PYTHONUNBUFFERED="1",
            MODEL_ARCH="hf_auto_causal_lm",
            HUGGINGFACE_MODEL_NAME_OR_PATH=str(model),
            DATASET_TYPE="disk",
            DATASET_PATH=str(data),
            SEQUENCE_LENGTH=str(args.seq),
            BATCH_SIZE=str(args.batch_size),
            GRADIENT_ACCU_NUM="1",
            MAX_STEPS=str(args.steps),
            WARMUP_STEPS=str(WINDOW),
            LEARNING_RATE=args.lr,
            LOG_INTERVAL="1",
            LOG_FORMAT="json",
            EVALUATE="0",
            OUTPUT_DIR=str(work / "runs" / precision),
            PRECISION=precision,
            COMPILE=args.compile,
            SEED="1",
            USER_DIR=str(REPO / "tests" / "assets" / "exact_loss"),
            MASTER_PORT=str(free_port()),
        )
        log = open(work / f"{precision}.log", "w")
        cmd = ["bash", str(RUN_SH), "--no-save", "--disable-validation"]
        runs[precision] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True), log)
    start, losses = time.time(), {}
    for precision, (proc, log) in runs.items():
        try:
            stdout, _ = proc.communicate(timeout=max(1.0, args.timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        log.write("\n---- stdout ----\n" + stdout[-20000:])
        log.close()
        found = losses_of(stdout)
        losses[precision] = [found.get(i, float("nan")) for i in range(1, args.steps + 1)]
        print(f"{precision}: rc {proc.returncode}, {len(found)} updates logged", flush=True)
    with open(args.out / "losses.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["update", *precisions])
        for i in range(args.steps):
            writer.writerow([i + 1, *[losses[p][i] for p in precisions]])
    reference, other = precisions[0], precisions[-1]
    lines = [
        f"# {other} against {reference}: {'tiny' if args.tiny else '1.1B'} Llama from scratch, {args.steps} updates "
        f"of {args.batch_size} x {args.seq} byte tokens of Python source, lr {args.lr}, COMPILE={args.compile}",
        "",
    ]
    if all(v == v for p in precisions for v in losses[p]):
        c = compare(losses[reference], losses[other])
        within = c["max_moving_gap"] <= MAX_RELATIVE and c["final_gap"] <= FINAL_RELATIVE
        lines += [
            f"- loss of the first update: {losses[reference][0]:.4f} / {losses[other][0]:.4f}",
            f"- mean of the last {WINDOW} updates: {c['final_reference']:.4f} / {c['final_other']:.4f} "
            f"(gap {c['final_gap']:.2%}, tolerance {FINAL_RELATIVE:.0%})",
            f"- largest gap of the {WINDOW}-update moving averages: {c['max_moving_gap']:.2%} "
            f"(tolerance {MAX_RELATIVE:.0%})",
            f"- {'WITHIN' if within else 'OUTSIDE'} the tolerance",
        ]
    else:
        lines.append("- a run did not log every update: see its log")
    (args.out / "fp8_loss_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib
    except ImportError:
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for precision, color in zip(precisions, ("black", "tab:red", "tab:blue")):
        ax.plot(range(1, args.steps + 1), losses[precision], color=color, linewidth=0.6, alpha=0.4)
        ax.plot(range(WINDOW, args.steps + 1), moving_average(losses[precision], WINDOW), color=color, label=precision)
    ax.set_xlabel("update")
    ax.set_ylabel("loss (bits per byte token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fp8_loss_curve.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
