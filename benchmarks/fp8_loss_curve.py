"""Loss curves of PRECISION=fp8 against bf16-master: the 1.1B Llama (benchmarks/single_gpu_speed.py's MODEL_A,
random initial weights) trained from scratch on real text through run.sh, all runs on one GPU at the same time,
per-update losses compared. A run is ``PRECISION[@SEED]`` (seed 1 unless given; the seed draws the initial weights
and the data order): the default ``bf16-master,bf16-master@2,fp8`` runs bf16-master twice, so that the gap between
two bf16-master runs that differ only in their seed (the run-to-run spread of this from-scratch training) is
measured beside fp8's gap to bf16-master.

The text is the Python source of the installed torch package (sorted files, concatenated), one token per
byte (ids = byte + 3, under the tokenizer's pad/bos/eos ids), cut into rows of ``--seq`` tokens: real text
with its structure, no tokenizer or download needed.

    python benchmarks/fp8_loss_curve.py --out DIR [--work DIR] [--steps 320] [--seq 1024] [--batch-size 4]
    python benchmarks/fp8_loss_curve.py --out DIR --tiny --precisions fp32,fp32@2,bf16-master --compile 0 \
        --steps 30 --seq 64   # CPU smoke run

Writes DIR/losses.csv (update, one column per run), DIR/fp8_loss_curve.md (the comparison against the
tolerance below) and DIR/fp8_loss_curve.png (needs matplotlib; skipped without it); the model, data and one log
per run go to the work folder (default DIR/work).

Tolerance (the last run against the first): after the first ``WINDOW`` updates, the moving averages over
``WINDOW`` updates differ by at most ``MAX_RELATIVE`` of the first run's, or by no more than those of a run of the
first run's precision under another seed, whichever is larger; the means of the last ``WINDOW`` updates likewise
(``FINAL_RELATIVE``). A precision that changes the loss by less than a new seed does is within what the training
itself varies by.
"""

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_gpu_parity import losses_of  # noqa: E402
from speed_inputs import write_model_folder  # noqa: E402
from speed_models import MODEL_A, TINY_MODEL_A  # noqa: E402
from speed_processes import REPO, RUN_SH, free_port  # noqa: E402

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


def parse_run(name: str) -> Tuple[str, int]:
    """``PRECISION[@SEED]`` -> (precision, seed); seed 1 unless given."""
    precision, _, seed = name.partition("@")
    return precision, int(seed or 1)


def moving_average(values: List[float], window: int) -> List[float]:
    return [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]


def compare(reference: List[float], other: List[float], window: int = WINDOW) -> Dict[str, float]:
    """The two figures the tolerance bounds: the largest relative gap of the moving averages, and of the
    final window's means."""
    ref_avg, other_avg = moving_average(reference, window), moving_average(other, window)
    gaps = [abs(o - r) / abs(r) for r, o in zip(ref_avg, other_avg)]
    signed = [(o - r) / abs(r) for r, o in zip(ref_avg, other_avg)]
    final_ref, final_other = sum(reference[-window:]) / window, sum(other[-window:]) / window
    return dict(
        max_moving_gap=max(gaps),
        mean_signed_gap=sum(signed) / len(signed),
        final_gap=abs(final_other - final_ref) / abs(final_ref),
        final_reference=final_ref,
        final_other=final_other,
    )


def read_losses(path: Path) -> Dict[str, List[float]]:
    """The columns of a ``losses.csv`` this script wrote: run name -> per-update losses."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: [float(row[name]) for row in rows] for name in rows[0] if name != "update"}


def other_seeds(reference: str, names: List[str], earlier: Dict[str, List[float]], steps: int) -> List[str]:
    """The runs that measure the reference's seed spread: this call's runs of its precision under another seed,
    then an earlier call's (``--earlier``; named ``NAME (earlier)``) of the same length."""
    precision, seed = parse_run(reference)
    found = [n for n in names[1:-1] if parse_run(n)[0] == precision]
    for name, values in earlier.items():
        if parse_run(name)[0] == precision and parse_run(name)[1] != seed and len(values) == steps:
            found.append(f"{name} (earlier)")
    return found


def tolerance(reference: List[float], other_seeds: List[List[float]]) -> Tuple[float, float]:
    """The largest moving-average gap and final gap allowed against ``reference``: ``MAX_RELATIVE`` and
    ``FINAL_RELATIVE``, or those of the runs of the reference's precision under other seeds where larger."""
    spread = [compare(reference, losses) for losses in other_seeds]
    return (
        max([MAX_RELATIVE] + [c["max_moving_gap"] for c in spread]),
        max([FINAL_RELATIVE] + [c["final_gap"] for c in spread]),
    )


def summarize(
    losses: Dict[str, List[float]], names: List[str], earlier: Dict[str, List[float]], steps: int
) -> List[str]:
    """The comparison's lines: the last run against the first, against the tolerance that the first run's
    precision under other seeds (this call's and ``earlier``'s) sets; ``losses`` gains the earlier runs."""
    reference, other = names[0], names[-1]
    if not all(v == v for p in names for v in losses[p]):
        return ["- a run did not log every update: see its log"]
    lines = []
    losses.update({f"{n} (earlier)": v for n, v in earlier.items()})
    seeds = other_seeds(reference, names, earlier, steps)
    max_moving, max_final = tolerance(losses[reference], [losses[n] for n in seeds])
    lines.append(f"- loss of the first update: {' / '.join(f'{losses[n][0]:.4f}' for n in names)} ({', '.join(names)})")
    for n in names[1:-1] + [n for n in seeds if n not in names] + names[-1:]:
        c = compare(losses[reference], losses[n])
        lines.append(
            f"- {n} against {reference}: mean of the last {WINDOW} updates {c['final_reference']:.4f} / "
            f"{c['final_other']:.4f} (gap {c['final_gap']:.2%}), largest gap of the {WINDOW}-update moving "
            f"averages {c['max_moving_gap']:.2%}, mean signed gap {c['mean_signed_gap']:+.2%}"
        )
    for n in (reference, other):  # the same run in the earlier call: how far a repeat drifts
        if f"{n} (earlier)" in losses and len(losses[f"{n} (earlier)"]) == steps:
            c = compare(losses[f"{n} (earlier)"], losses[n])
            lines.append(
                f"- {n} against the same run in the earlier call: final gap {c['final_gap']:.2%}, largest "
                f"moving-average gap {c['max_moving_gap']:.2%}"
            )
    c = compare(losses[reference], losses[other])
    within = c["max_moving_gap"] <= max_moving and c["final_gap"] <= max_final
    lines += [
        f"- tolerance for {other}: moving averages within {max_moving:.2%}, final means within {max_final:.2%} "
        f"(the larger of {MAX_RELATIVE:.0%} / {FINAL_RELATIVE:.0%} and the gaps of {', '.join(seeds) or 'no'} "
        f"other-seed run)",
        f"- {'WITHIN' if within else 'OUTSIDE'} the tolerance",
    ]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", default="2e-4")
    parser.add_argument(
        "--precisions",
        default="bf16-master,bf16-master@2,fp8",
        help="runs, PRECISION[@SEED]: the first is the reference",
    )
    parser.add_argument("--text-root", type=Path, default=None, help="default: the installed torch package")
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a two-layer model: a CPU smoke run of the script")
    parser.add_argument("--compile", default="1", help="run.sh COMPILE")
    parser.add_argument(
        "--earlier",
        type=Path,
        default=None,
        help="losses.csv of an earlier call with the same settings: its runs of the reference's precision under "
        "other seeds widen the tolerance as this call's do (so this call needs no second seed of it)",
    )
    parser.add_argument(
        "--float8-args",
        default="",
        help="fairseq-train options of the fp8 / fp8-lean runs, e.g. '--float8-min-width 2048'",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    if args.text_root is None:
        import torch

        args.text_root = Path(torch.__file__).parent
    model = write_model_folder(work / "model", TINY_MODEL_A if args.tiny else MODEL_A, args.seq)
    data = write_text_dataset(work / "data", args.text_root, args.seq, args.steps * args.batch_size + args.batch_size)
    names = args.precisions.split(",")
    runs = {}
    for name in names:
        precision, seed = parse_run(name)
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
            OUTPUT_DIR=str(work / "runs" / name),
            PRECISION=precision,
            COMPILE=args.compile,
            SEED=str(seed),
            USER_DIR=str(REPO / "tests" / "assets" / "exact_loss"),
            MASTER_PORT=str(free_port()),
        )
        log = open(work / f"{name}.log", "w")
        cmd = ["bash", str(RUN_SH), "--no-save", "--disable-validation"]
        if precision.startswith("fp8"):
            cmd += shlex.split(args.float8_args)
        runs[name] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True), log)
    start, losses = time.time(), {}
    for name, (proc, log) in runs.items():
        try:
            stdout, _ = proc.communicate(timeout=max(1.0, args.timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        log.write("\n---- stdout ----\n" + stdout[-20000:])
        log.close()
        found = losses_of(stdout)
        losses[name] = [found.get(i, float("nan")) for i in range(1, args.steps + 1)]
        print(f"{name}: rc {proc.returncode}, {len(found)} updates logged", flush=True)
    with open(args.out / "losses.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["update", *names])
        for i in range(args.steps):
            writer.writerow([i + 1, *[losses[p][i] for p in names]])
    reference, other = names[0], names[-1]
    lines = [
        f"# {other} against {reference}: {'tiny' if args.tiny else '1.1B'} Llama from scratch, {args.steps} updates "
        f"of {args.batch_size} x {args.seq} byte tokens of Python source, lr {args.lr}, COMPILE={args.compile}"
        + (f", fp8 runs with {args.float8_args}" if args.float8_args else ""),
        "",
    ]
    earlier = read_losses(args.earlier) if args.earlier else {}
    lines += summarize(losses, names, earlier, args.steps)
    (args.out / "fp8_loss_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib
    except ImportError:
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, color in zip(names, ("black", "tab:gray", "tab:red", "tab:blue", "tab:green")):
        ax.plot(range(1, args.steps + 1), losses[name], color=color, linewidth=0.6, alpha=0.4)
        ax.plot(range(WINDOW, args.steps + 1), moving_average(losses[name], WINDOW), color=color, label=name)
    ax.set_xlabel("update")
    ax.set_ylabel("loss (bits per byte token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fp8_loss_curve.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
