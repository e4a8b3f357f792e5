"""Merge the losses.csv of several multi_gpu_parity.py runs and plot each plan against its one-GPU reference.

    python benchmarks/plot_parity.py OUT_DIR RUN_DIR [RUN_DIR ...] [--drop NAME,...]   (needs matplotlib)

Writes OUT_DIR/losses.csv (one column per run name; a later run's column replaces an earlier one; the
one-GPU references are deterministic, so repeated ones are checked equal) and OUT_DIR/parity.png.
"""

import csv
import sys
from pathlib import Path

REFERENCE = {
    "tp2": "1gpu_accu1",
    "pp2_1f1b": "1gpu_accu1",
    "pp2_interleaved": "1gpu_accu1",
    "tp2_pp2": "1gpu_accu1",
    "dp2": "1gpu_accu2",
    "tp2_x2units": "1gpu_accu2",
    "tp2_x2units_zero": "1gpu_accu2",
}


def read(path: Path) -> dict:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {name: [float(r[name]) if r[name] else float("nan") for r in rows] for name in rows[0] if name != "step"}


def main(argv) -> int:
    drop = set()
    if "--drop" in argv:
        at = argv.index("--drop")
        drop, argv = set(argv[at + 1].split(",")), argv[:at] + argv[at + 2 :]
    out, runs = Path(argv[0]), [Path(p) for p in argv[1:]]
    merged = {}
    for run in runs:
        for name, values in read(run / "losses.csv").items():
            if name in merged and name.startswith("1gpu") and merged[name] != values:
                raise SystemExit(f"{name} differs between runs: the one-GPU reference is not deterministic")
            if name not in drop and all(v == v for v in values):  # complete columns only (failed runs have none)
                merged[name] = values
    steps = len(next(iter(merged.values())))
    with open(out / "losses.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *merged])
        for i in range(steps):
            writer.writerow([i + 1, *[merged[n][i] for n in merged]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = [n for n in merged if n in REFERENCE]
    fig, axes = plt.subplots(len(plans), 1, figsize=(8, 2.4 * len(plans)), sharex=True)
    for ax, name in zip(axes, plans):
        ref = REFERENCE[name]
        ax.plot(range(1, steps + 1), merged[ref], label=f"{ref} (one GPU)", color="black", linewidth=1)
        ax.plot(range(1, steps + 1), merged[name], label=name, color="tab:red", linewidth=1, linestyle="--")
        ax.set_ylabel("loss (bits)")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("update")
    fig.suptitle("bf16 training loss of each plan vs one GPU (4-layer tiny Llama, NCCL, 4x H200)")
    fig.tight_layout()
    fig.savefig(out / "parity.png", dpi=90)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
