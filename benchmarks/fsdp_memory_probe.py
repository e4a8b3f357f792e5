"""What FSDP2 holds beyond the plain model at the peak of a forward and backward, on one rank, without a GPU.

A Llama-shaped Hugging Face model in bf16 on fake tensors (``FakeTensorMode``: shapes only, nothing computed,
no memory used) runs two forward-backward passes twice: plain, under torch's ``MemTracker``, and sharded as
the runtime shards it (``fairseq_ext.cube.runtime.fsdp.shard_data_parallel`` over a mesh of one rank at the
given ZeRO level, gradients reduced in float32 as ``bf16-master`` does) under ``FSDPMemTracker``. Both peaks
are printed by category, in GiB, with their difference. Eager only: compiled layers' activations and the
optimizer's states are not in it (they are the same on both sides).

    python benchmarks/fsdp_memory_probe.py --layers 22 --mb 8 --seq 2048   # the 1.1B shape of the speed rows
"""

import argparse
import json
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
    from transformers import LlamaConfig, LlamaForCausalLM

    from fairseq_ext.cube.plan import Plan
    from fairseq_ext.cube.runtime.fsdp import shard_data_parallel

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
    mesh = init_device_mesh("cpu", (1,))
    result = {}
    for sharded in (False, True):
        with FakeTensorMode():
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(default)
            if sharded:
                plan = Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, zero=zero)
                shard_data_parallel([model], model, plan, mesh, reduce_dtype=torch.float32)
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
    args = parser.parse_args(argv)
    if args.zero not in (1, 2, 3):
        parser.error("--zero is a ZeRO level on FSDP2: 1, 2 or 3")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        result = probe(
            args.layers,
            args.hidden,
            args.intermediate,
            args.heads,
            args.kv_heads,
            args.vocab,
            args.mb,
            args.seq,
            args.zero,
        )
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
