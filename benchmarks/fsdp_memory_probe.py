"""What FSDP2 holds beyond the plain model at the peak of a forward and backward, on one rank, without a GPU.

A Llama-shaped Hugging Face model in bf16 on fake tensors (``FakeTensorMode``: shapes only, nothing computed,
no memory used) runs two forward-backward passes plain, under torch's ``MemTracker``, and two sharded as
the runtime shards it (``fairseq_ext.cube.runtime.fsdp.shard_data_parallel`` over a mesh of one rank at the
given ZeRO level, gradients reduced as ``bf16-master`` reduces them on one rank: in their own bf16) under ``FSDPMemTracker``. Both peaks
are printed by category, in GiB, with their difference. Eager layers; the optimizer's states are not in it
(the same on both sides).

With ``--real`` (small shapes: it computes, on the CPU) the model runs on real tensors instead, its decoder
layers compiled as ``COMPILE=1`` compiles them with ``--compile``, and the peak is the CPU allocator's, from
``torch.profiler``'s memory events over one forward-backward after two warm-up passes (bytes above the start).

    python benchmarks/fsdp_memory_probe.py --layers 22 --mb 8 --seq 2048   # the 1.1B shape of the speed rows
    python benchmarks/fsdp_memory_probe.py --real --compile --layers 4 --hidden 512 --intermediate 1408 \\
        --heads 8 --kv-heads 2 --vocab 4000 --mb 4 --seq 256
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024**3


def probe(layers, hidden, intermediate, heads, kv_heads, vocab, mb, seq, zero) -> dict:
    """Peak bytes by category of the plain model and of the FSDP2 one at ZeRO ``zero`` (1-3), and their
    totals; needs a process group of one rank (``fake`` is enough)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh

    from fairseq_ext.cube.plan import Plan
    from fairseq_ext.cube.runtime.fsdp import shard_data_parallel
    from fairseq_ext.cube.runtime.precision import reduce_dtype

    mesh = init_device_mesh("cpu", (1,))
    result = {}
    for sharded in (False, True):
        with FakeTensorMode():
            model = _llama(layers, hidden, intermediate, heads, kv_heads, vocab, seq)
            if sharded:
                plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, zero=zero)
                shard_data_parallel([model], model, plan, mesh, reduce_dtype("bf16-master", 1))
                tracker = FSDPMemTracker(model, None)
            else:
                tracker = MemTracker()
                tracker.track_external(model)
            ids = torch.randint(0, vocab, (mb, seq))
            with tracker:
                for _ in range(2):  # the second pass finds the first one's state gone
                    model(input_ids=ids, labels=ids).loss.backward()
                    for param in model.parameters():
                        param.grad = None
                    tracker.reset_mod_stats()
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        result["fsdp2" if sharded else "plain"] = {getattr(k, "value", str(k)): v for k, v in peak.items() if v}
    result["params"] = sum(p.numel() for p in model.parameters())
    result["extra_bytes"] = result["fsdp2"]["Total"] - result["plain"]["Total"]
    return result


def _llama(layers, hidden, intermediate, heads, kv_heads, vocab, seq):
    """A Llama-shaped Hugging Face causal LM in bf16 (fake tensors under ``FakeTensorMode``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=seq,
        attn_implementation="sdpa",
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def probe_real(layers, hidden, intermediate, heads, kv_heads, vocab, mb, seq, zero, compiled) -> dict:
    """Peak CPU bytes allocated above the start of one forward-backward (after two), plain and on FSDP2 at ZeRO
    ``zero``, real tensors; ``compiled``: the decoder layers compiled. Needs a gloo process group of one rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import ProfilerActivity, profile

    from fairseq_ext.cube.plan import Plan
    from fairseq_ext.cube.runtime.compile_layers import compile_layers
    from fairseq_ext.cube.runtime.fsdp import shard_data_parallel
    from fairseq_ext.cube.runtime.precision import reduce_dtype

    mesh = init_device_mesh("cpu", (1,))
    result = {}
    for sharded in (False, True):
        torch.manual_seed(0)
        model = _llama(layers, hidden, intermediate, heads, kv_heads, vocab, seq)
        if compiled:
            compile_layers(model)
        if sharded:
            plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, zero=zero)
            shard_data_parallel([model], model, plan, mesh, reduce_dtype("bf16-master", 1))
        ids = torch.randint(0, vocab, (mb, seq))

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            for param in model.parameters():
                param.grad = None

        step()
        step()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted(
            (event.start_ns(), event.nbytes())
            for event in prof.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        )
        now = peak = 0
        for _, nbytes in events:
            now += nbytes
            peak = max(peak, now)
        result["fsdp2" if sharded else "plain"] = {"Total": peak}
    result["params"] = sum(p.numel() for p in model.parameters())
    result["extra_bytes"] = result["fsdp2"]["Total"] - result["plain"]["Total"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (
        ("layers", 22),
        ("hidden", 2048),
        ("intermediate", 5632),
        ("heads", 32),
        ("kv-heads", 4),
        ("vocab", 32000),
        ("mb", 8),
        ("seq", 2048),
        ("zero", 1),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--real", action="store_true", help="real tensors on the CPU (small shapes), CPU allocator")
    parser.add_argument("--compile", action="store_true", help="with --real: the decoder layers compiled (COMPILE=1)")
    args = parser.parse_args(argv)
    if args.zero not in (1, 2, 3):
        parser.error("--zero is a ZeRO level on FSDP2: 1, 2 or 3")
    if args.compile and not args.real:
        parser.error("--compile needs --real (fake tensors are not compiled)")
    shape = (args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab, args.mb, args.seq)
    if args.real:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    else:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        result = probe_real(*shape, args.zero, args.compile) if args.real else probe(*shape, args.zero)
    finally:
        dist.destroy_process_group()
    for side in ("plain", "fsdp2"):
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in result[side].items())
        print(f"{side}: {parts} GiB")
    print(
        f"FSDP2 (ZeRO {args.zero}) holds {result['extra_bytes'] / GIB:.2f} GiB more at the peak; "
        f"the weights in bf16 are {result['params'] * 2 / GIB:.2f} GiB"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
