"""The LM head and its loss, forward and backward, on one GPU: the chunked loss
(``fairseq_ext/cube/runtime/chunked_loss.py``, with the chunk the criterion gives it) against Liger Kernel's fused
linear cross-entropy and against plain PyTorch (the whole logits, as Hugging Face models compute them), measured
in the same run at the shapes of benchmarks/single_gpu_speed.py's rows.

For each variant: the median time of one summed loss and its backward (each call between two device
synchronizations, so a variant that waits for the device inside is charged for it), the peak memory allocated
above the inputs (the two gradients included), whether it waits for the device (a call under
``torch.cuda.set_sync_debug_mode("error")``), and its agreement with a float32 reference on the same bf16 inputs:
``|loss - ref| / |ref|`` and ``||grad - ref|| / ||ref||`` of the hidden states' and the head's gradients.

    python3 benchmarks/lm_loss_speed.py [--shapes 1.1B-full,8B-lora,8B-full] [--reps 20] [--out DIR]
    python3 benchmarks/lm_loss_speed.py --tiny      # CPU smoke run: the chunked loss and plain PyTorch only

Inputs: hidden states N(0, 1) and a head N(0, 0.02) in bf16, targets uniform in [3, vocab) with one in twenty
ignored (-100), drawn afresh for the agreement check. Writes ``lm_loss_speed.json`` and ``lm_loss_speed.md`` to
``--out`` (default $OUT, else .).
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_ext.cube.runtime.chunked_loss import chunk_rows, linear_cross_entropy  # noqa: E402

IGNORE = -100
# tokens of one micro-batch, hidden, vocab, whether the head trains: single_gpu_speed.py's rows at seq 2048
SHAPES = {
    "1.1B-full": dict(tokens=8 * 2048, hidden=2048, vocab=32000, head_grad=True),
    "8B-lora": dict(tokens=2 * 2048, hidden=4096, vocab=128256, head_grad=False),
    "8B-full": dict(tokens=2 * 2048, hidden=4096, vocab=128256, head_grad=True),
}
TINY = {"tiny": dict(tokens=96, hidden=32, vocab=200, head_grad=True)}


def plain(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The whole logits, then float32 cross entropy: what Hugging Face's causal-LM loss computes."""
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=IGNORE, reduction="sum")


def variants(vocab: int) -> Dict[str, Callable]:
    """name -> fn(hidden, weight, target) returning the summed loss; Liger's only where it imports."""
    found = {
        "chunked": lambda h, w, t: linear_cross_entropy(h, w, t, IGNORE, chunk_size=chunk_rows(vocab)),
        "plain": plain,
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
    except ImportError:
        return found
    for const in (1, 8):  # Liger's logits budget: const x tokens x hidden elements (1: its default)
        found[f"liger-fp32acc-c{const}"] = lambda h, w, t, c=const: liger(
            h, w, t, ignore_index=IGNORE, reduction="sum", accum_dtype=torch.float32, chunk_mem_const=c
        )
    found["liger-default"] = lambda h, w, t: liger(h, w, t, ignore_index=IGNORE, reduction="sum")
    return found


def inputs(shape: dict, device: torch.device, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens, hidden, vocab = shape["tokens"], shape["hidden"], shape["vocab"]
    h = torch.randn(tokens, hidden, generator=generator, device=device).bfloat16().requires_grad_()
    w = (0.02 * torch.randn(vocab, hidden, generator=generator, device=device)).bfloat16()
    w.requires_grad_(shape["head_grad"])
    t = torch.randint(3, vocab, (tokens,), generator=generator, device=device)
    t[torch.rand(tokens, generator=generator, device=device) < 0.05] = IGNORE
    return h, w, t


def relative(x: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> Optional[float]:
    if x is None or ref is None:
        return None
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def agreement(fn: Callable, shape: dict, device: torch.device, seed: int) -> dict:
    """The variant's loss and gradients against float32 arithmetic on the same bf16 inputs."""
    h, w, t = inputs(shape, device, seed)
    loss = fn(h, w, t)
    loss.backward()
    hf = h.detach().float().requires_grad_()
    wf = w.detach().float().requires_grad_(w.requires_grad)
    ref = F.cross_entropy(hf @ wf.T, t, ignore_index=IGNORE, reduction="sum")
    ref.backward()
    return dict(
        loss=relative(loss.detach(), ref.detach()),
        grad_hidden=relative(h.grad, hf.grad),
        grad_head=relative(w.grad, wf.grad),
        finite=bool(torch.isfinite(loss).item()),
    )


def measure(fn: Callable, shape: dict, device: torch.device, reps: int) -> dict:
    """Median milliseconds of a synchronized forward+backward, peak MiB above the inputs, device waits."""
    h, w, t = inputs(shape, device, seed=0)

    def step():
        h.grad = w.grad = None
        fn(h, w, t).backward()

    for _ in range(3):
        step()
    on_gpu = device.type == "cuda"
    times = []
    for _ in range(reps):
        if on_gpu:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e3)
    result = dict(ms=statistics.median(times), ms_min=min(times))
    if on_gpu:
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        h.grad = w.grad = None
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            result["waits_for_device"] = False
        except RuntimeError:
            result["waits_for_device"] = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result


def run(shapes: Dict[str, dict], device: torch.device, reps: int) -> dict:
    results = {}
    for name, shape in shapes.items():
        for variant, fn in variants(shape["vocab"]).items():
            try:
                row = dict(measure(fn, shape, device, reps), **agreement(fn, shape, device, seed=1))
            except Exception as error:  # one variant failing at one shape still leaves the others' numbers
                row = dict(error=f"{type(error).__name__}: {error}"[:300])
            results[f"{name} {variant}"] = row
            print(f"{name} {variant}: {row}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def table(results: dict) -> str:
    lines = [
        "| shape variant | ms (median) | peak MiB above inputs | waits for device | loss rel. err | "
        "grad hidden rel. err | grad head rel. err |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in results.items():

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        if "error" in r:
            lines.append(f"| {key} | failed: {r['error'][:120]} | | | | | |")
            continue
        lines.append(
            f"| {key} | {r['ms']:.2f} | {f(r.get('peak_mib'), '.0f')} | {f(r.get('waits_for_device'), '')} | "
            f"{f(r['loss'], '.1e')} | {f(r['grad_hidden'], '.1e')} | {f(r['grad_head'], '.1e')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    if args.tiny:
        shapes, device = TINY, torch.device("cpu")
    else:
        shapes, device = {n: SHAPES[n] for n in args.shapes.split(",")}, torch.device("cuda")
    results = run(shapes, device, args.reps)
    environment = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        environment["liger_kernel"] = version("liger-kernel")
    except ImportError:
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lm_loss_speed.json").write_text(json.dumps(dict(environment=environment, results=results), indent=1))
    text = table(results)
    (args.out / "lm_loss_speed.md").write_text(f"{environment}\n\n{text}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
