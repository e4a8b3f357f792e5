"""GPU time of one torch_adamw step over a Llama model's weights: bf16 weights with float32 masters stepped
by the one-launch Triton kernel (``fairseq_ext/optim/master_step.py``) against torch's fused AdamW on float32
copies of the gradients (cast, step, copy back: the path it replaced, measured in the same run).

    python3 benchmarks/optimizer_step.py [--shape 1.1B|8B] [--steps 20] [--out DIR]

Random weights and gradients on the GPU, shapes as benchmarks/single_gpu_speed.py's models. The host queues
all timed steps behind a device sleep first, so CUDA events measure the device's time alone; the host's
time per step is reported beside it. Writes ``optimizer_step.json`` to ``--out`` (default $OUT, else .).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fairseq_ext.optim import master_step  # noqa: E402
from fairseq_ext.optim.adamw import MixedPrecisionAdamW  # noqa: E402
from single_gpu_speed import MODEL_A, MODEL_B, linear_shapes  # noqa: E402

SHAPES = {"1.1B": MODEL_A, "8B": MODEL_B}
BYTES_PER_PARAM = 28  # bf16 gradient read, float32 master and moments read and written, bf16 weight written


def weight_shapes(shape: dict) -> list:
    """(out, in) of every weight of a Llama model: embeddings, lm_head, each layer's projections and norms."""
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    layer = [(out, inp) for inp, out in linear_shapes(shape).values()] + [(hidden,), (hidden,)]
    return [(vocab, hidden), (vocab, hidden), (hidden,)] + layer * shape["num_hidden_layers"]


def time_steps(optimizer, scale, steps: int) -> dict:
    """Device and host milliseconds per ``optimizer.step`` (after warm-up steps)."""
    for _ in range(3):
        optimizer.step(grad_scale=scale)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(4e9))  # seconds of device time: the host queues every timed step before they run
    start.record()
    began = time.perf_counter()
    for _ in range(steps):
        optimizer.step(grad_scale=scale)
    host_ms = (time.perf_counter() - began) * 1e3 / steps
    end.record()
    torch.cuda.synchronize()
    return {"device_ms": start.elapsed_time(end) / steps, "host_ms": host_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1B")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "."))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("optimizer_step: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = weight_shapes(SHAPES[args.shape])
    params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(torch.bfloat16)) for s in shapes]
    for param in params:
        param.grad = torch.randn_like(param)
    count = sum(p.numel() for p in params)
    scale = torch.tensor(0.5, device="cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
               "params": count, "tensors": len(params)}
    # torch's path is the one the optimizer takes where Triton does not import
    paths = {"triton_one_launch": master_step.triton_available, "torch_fused_cast_copy": lambda: False}
    for name, available in paths.items():
        master_step.triton_available = available
        optimizer = MixedPrecisionAdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        timing = time_steps(optimizer, scale, args.steps)
        timing["TB/s at 28 bytes/param"] = count * BYTES_PER_PARAM / timing["device_ms"] / 1e9
        results[name] = timing
        del optimizer
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer_step.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
