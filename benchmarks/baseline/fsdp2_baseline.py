"""FSDP2-only baseline: a Hugging Face Llama trained with torch's ``fully_shard`` and nothing else.

Every decoder layer and the root are ``fully_shard``-ed over all ranks (ZeRO-3), bf16 compute with float32
gradient reduction and float32 sharded master weights (``MixedPrecisionPolicy``), torch AdamW (fused on GPUs),
Hugging Face's own loss (full logits), SDPA attention, optional activation checkpointing of every layer and
``torch.compile`` of every layer. Random weights from the config, random token ids in [3, vocab); the first
``--warmup`` steps are dropped and medians of the timed steps (CUDA events) reported.

    torchrun --nproc-per-node 2 benchmarks/baseline/fsdp2_baseline.py --shape 8B --seq 4096 --mb 1 --out r.json
    torchrun --nproc-per-node 2 benchmarks/baseline/fsdp2_baseline.py --shape tiny --seq 64 --mb 2   # CPU, gloo

Rank 0 writes one JSON object: tokens/s per GPU, step time, peak memory, the bf16 matmul rate it measured.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

SHAPES = {
    "8B": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    ),
    "1.1B": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
    ),
}


def build_model(shape: dict, seq: int, device: torch.device, compile_layers: bool, checkpoint: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 2048), tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
        if compile_layers:
            layer.compile()
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.normal_(0.0, config.initializer_range)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers were left on meta
    return model


def matmul_rate(device: torch.device) -> float:
    """bf16 FLOP/s of an 8192^3 matrix product on random data (median of 10 after 3 warm-ups)."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8B")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--mb", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile every decoder layer")
    parser.add_argument("--checkpoint", action="store_true", help="activation checkpointing of every layer")
    parser.add_argument("--out", help="rank 0 writes the result JSON here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rate = matmul_rate(device) if cuda and rank == 0 else None
    torch.manual_seed(1)
    start = time.time()
    model = build_model(SHAPES[args.shape], args.seq, device, args.compile, args.checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda or None, foreach=None if cuda else True)
    generator = torch.Generator().manual_seed(1000 + rank)
    vocab = SHAPES[args.shape]["vocab_size"]
    steps, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(3, vocab, (args.mb, args.seq), generator=generator).to(device, non_blocking=True)
        begin = time.perf_counter()
        if cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            events[0].record()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            events[1].record()
            events[1].synchronize()
            seconds = events[0].elapsed_time(events[1]) / 1000
        else:
            seconds = time.perf_counter() - begin
        losses.append(loss.item())
        if step >= args.warmup:
            steps.append(seconds)
    step_s = statistics.median(steps)
    result = dict(
        shape=args.shape,
        seq=args.seq,
        mb=args.mb,
        gpus=world,
        compile=args.compile,
        checkpoint=args.checkpoint,
        step_median_s=step_s,
        tokens_per_s_per_gpu=args.mb * args.seq / step_s,
        peak_alloc_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        matmul_bf16_flops=rate,
        losses=losses,
        wall_s=time.time() - start,
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name(device) if cuda else "none",
    )
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
