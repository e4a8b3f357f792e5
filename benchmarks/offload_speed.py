"""Activation offloading on one GPU: a forward-backward of a Llama model at a long sequence with the decoder
layers' activations kept on the device, offloaded to pinned host memory (``runtime/offload.py``) or recomputed,
eager or compiled; tokens/s and peak memory of each, and the host link's copy bandwidth (pinned memory,
both ways) that the cost model's ``Hardware.host_bandwidth`` stands for.

No optimizer step and no fairseq: the rows differ only in what the layers keep, so the differences are the
copies' and the recompute's cost. Random weights (shape A: the 1.1B model of single_gpu_speed.py; B: 8B).

    python benchmarks/offload_speed.py [--model A] [--seq 8192] [--modes none,offload,recompute] [--compile 1]

Writes ``offload_speed.json`` to ``--out`` (default $OUT, else ./benchmark_out) after every row and prints a table.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_models import MODEL_A, MODEL_B  # noqa: E402

from fairseq_ext.cube.runtime.offload import apply_offload, offloaded_modules  # noqa: E402
from fairseq_ext.cube.runtime.recompute import apply_recompute  # noqa: E402

# the shapes of single_gpu_speed.py (the baseline's MODEL_A / MODEL_B); the rotary table is computed per position
SHAPES = {"A": MODEL_A, "B": MODEL_B}
LAYER = "LlamaDecoderLayer"


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Median GB/s of device -> pinned host and pinned host -> device copies of ``gib`` GiB."""
    device = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    host = torch.empty(device.numel(), dtype=torch.uint8, pin_memory=True)
    result = {}
    for name, (dst, src) in {"d2h": (host, device), "h2d": (device, host)}.items():
        times = []
        for _ in range(repeats + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        result[name] = device.numel() / statistics.median(times[1:]) / 1e9
    return result


def build(shape: str, mode: str, compiled: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if mode == "offload":
        apply_offload(model, [LAYER])
        layers = [w._checkpoint_wrapped_module for w in offloaded_modules(model)]
    else:
        layers = list(model.model.layers)
        if mode == "recompute":
            apply_recompute(model, [LAYER])
    if compiled:
        for layer in layers:
            layer.compile()
    return model


def measure(model, tokens, warmup: int, steps: int) -> dict:
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        end.record()
        end.synchronize()
        model.zero_grad(set_to_none=True)
        times.append(start.elapsed_time(end) / 1e3)
    step_s = statistics.median(times[warmup:])
    return dict(step_s=step_s, tokens_per_s=tokens.numel() / step_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="A")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default="none,offload,recompute")
    parser.add_argument("--compile", type=int, choices=(0, 1), nargs="+", default=[1])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmark_out"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        settings=dict(vars(args), out=str(args.out)),
        copy_gb_per_s=copy_bandwidth(),
        rows=[],
    )
    print(f"{report['device']}, torch {report['torch']}: pinned copies {report['copy_gb_per_s']}", flush=True)
    tokens = torch.randint(3, SHAPES[args.model]["vocab_size"], (args.batch, args.seq), device="cuda")
    for compiled in args.compile:
        for mode in args.modes.split(","):
            started = time.time()
            model = build(args.model, mode, bool(compiled))
            try:
                row = measure(model, tokens, args.warmup, args.steps)
            except torch.OutOfMemoryError:
                row = dict(error="out of memory")
            stats = [w.last_stats for w in offloaded_modules(model)]
            row.update(
                mode=mode,
                compiled=compiled,
                wall_s=round(time.time() - started, 1),
                offloaded_gib=sum(s["offloaded"] for s in stats) / 2**30,
                kept_gib=sum(s["kept"] for s in stats) / 2**30,
            )
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            del model
            torch.cuda.empty_cache()
            (args.out / "offload_speed.json").write_text(json.dumps(report, indent=1))
    print(f"{'mode':<10} {'compiled':>8} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9} {'offloaded GiB':>14}")
    for r in report["rows"]:
        print(
            f"{r['mode']:<10} {r['compiled']:>8} {r.get('tokens_per_s', 0):>10.0f} {r.get('step_s', 0):>8.3f} "
            f"{r.get('peak_gib', 0):>9.2f} {r['offloaded_gib']:>14.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
