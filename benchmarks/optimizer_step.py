"""GPU time of one torch_adamw step over a Llama model's weights, each one-launch Triton kernel against what
it replaced, measured in the same run:

- ``--precision bf16-master``: bf16 weights with float32 masters (``fairseq_ext/optim/master_step.py``)
  against torch's fused AdamW on float32 copies of the gradients (cast, step, copy back);
- ``--precision bf16-lean``: bf16 weights and moments, stochastic rounding (``fairseq_ext/optim/lean_step.py``)
  against the unfused chunked step (the path without Triton) and, where it imports, torchao's
  ``AdamW(bf16_stochastic_round=True)`` (bf16 moments too; one compiled step per weight).

    python3 benchmarks/optimizer_step.py [--precision bf16-master|bf16-lean] [--shape 1.1B|8B] [--steps 20] [--out DIR]

Random weights and gradients on the GPU, shapes as benchmarks/single_gpu_speed.py's models. The host queues
all timed steps behind a device sleep first, so CUDA events measure the device's time alone; the host's
time per step is reported beside it. Writes ``optimizer_step_<precision>_<shape>.json`` to ``--out``
(default $OUT, else .).
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

from speed_models import MODEL_A, MODEL_B, linear_shapes  # noqa: E402

from fairseq_ext.optim import lean_step, master_step  # noqa: E402
from fairseq_ext.optim.adamw import MixedPrecisionAdamW  # noqa: E402

SHAPES = {"1.1B": MODEL_A, "8B": MODEL_B}
# what the kernel moves: bf16 gradient read; float32 master and moments (bf16 moments and weight for
# bf16-lean) read and written; bf16 weight written
BYTES_PER_PARAM = {"bf16-master": 28, "bf16-lean": 14}


def weight_shapes(shape: dict) -> list:
    """(out, in) of every weight of a Llama model: embeddings, lm_head, each layer's projections and norms."""
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    layer = [(out, inp) for inp, out in linear_shapes(shape).values()] + [(hidden,), (hidden,)]
    return [(vocab, hidden), (vocab, hidden), (hidden,)] + layer * shape["num_hidden_layers"]


def time_steps(step, steps: int) -> dict:
    """Device and host milliseconds per call of ``step`` (after warm-up steps)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(4e9))  # seconds of device time: the host queues every timed step before they run
    start.record()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    host_ms = (time.perf_counter() - began) * 1e3 / steps
    end.record()
    torch.cuda.synchronize()
    return {"device_ms": start.elapsed_time(end) / steps, "host_ms": host_ms}


def optimizers(precision: str, params: list, scale: torch.Tensor) -> dict:
    """name -> a function that makes the optimizer and returns its step (one call: one step)."""
    settings = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def ours(module, fused: bool):
        def make():
            module.triton_available = (lambda: True) if fused else (lambda: False)
            optimizer = MixedPrecisionAdamW(params, **settings, lean_states=precision == "bf16-lean")
            return lambda: optimizer.step(grad_scale=scale)

        return make

    if precision == "bf16-master":
        # torch's path is the one the optimizer takes where Triton does not import
        return {"triton_one_launch": ours(master_step, True), "torch_fused_cast_copy": ours(master_step, False)}

    def torchao():
        import torchao.optim

        # torchao 0.18 keeps its plain AdamW (bf16 states, stochastic rounding) as _AdamW
        adamw_class = getattr(torchao.optim, "AdamW", None) or torchao.optim._AdamW
        optimizer = adamw_class(params, **settings, bf16_stochastic_round=True)
        return optimizer.step  # gradients as they are: torchao takes no scale

    return {
        "triton_one_launch": ours(lean_step, True),
        "unfused_chunked": ours(lean_step, False),
        "torchao_bf16_stochastic_round": torchao,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=sorted(BYTES_PER_PARAM), default="bf16-master")
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
    bytes_per_param = BYTES_PER_PARAM[args.precision]
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "precision": args.precision,
        "shape": args.shape,
        "params": count,
        "tensors": len(params),
    }
    for name, make in optimizers(args.precision, params, scale).items():
        try:  # torchao may not import, or not compile, with this torch: the others still run
            step = make()
            timing = time_steps(step, args.steps)
        except Exception as error:  # noqa: BLE001
            results[name] = {"failed": f"{type(error).__name__}: {str(error)[:500]}"}
            torch.cuda.empty_cache()
            continue
        timing[f"TB/s at {bytes_per_param} bytes/param"] = count * bytes_per_param / timing["device_ms"] / 1e9
        results[name] = timing
        del step
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"optimizer_step_{args.precision}_{args.shape}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
