"""The CPU check of README.md: a 4-layer Llama (width 256) trained from scratch on byte tokens of torch's Python
source as bf16-master trains (bf16 weights, float32 master weights and AdamW moments, clip 1.0, 20 warm-up updates,
linear decay), with its decoder layers' q/o/gate/up/down as torchao Float8Linear (tensorwise, emulated matmuls) or
not, under a seed (initial weights and data order).

    PYTHONPATH=<torchao 0.18> python cpu_emulated.py bf16@1 300   # prints the run, its seconds, 300 losses (bits)
"""

import math
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)
seq, bs, steps, lr, warm = 256, 8, int(sys.argv[2]), 2e-3, 20
root = Path(torch.__file__).parent
ids = []
for p in sorted(root.rglob("*.py")):
    ids.extend(b + 3 for b in p.read_bytes())
    if len(ids) >= seq * bs * (steps + 1):
        break
data = torch.tensor(ids[: seq * bs * steps]).view(steps * bs, seq)


def run(mode, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=260,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
    )
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if mode == "fp8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        for layer in m.model.layers:
            convert_to_float8_training(
                layer,
                module_filter_fn=lambda mod, n: (
                    n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
                ),
                config=Float8LinearConfig(emulate=True),
            )
    params = [p for p in m.parameters()]
    master = [p.detach().float().clone().requires_grad_(False) for p in params]
    opt = torch.optim.AdamW(master, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.shape[0], generator=g)
    out = []
    for step in range(steps):
        f = (step + 1) / warm if step < warm else max(0.0, (steps - step) / (steps - warm))
        for grp in opt.param_groups:
            grp["lr"] = lr * f
        batch = data[order[step * bs : (step + 1) * bs]]
        loss = m(input_ids=batch, labels=batch).loss
        loss.backward()
        norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in params))
        clip = min(1.0, 1.0 / (norm.item() + 1e-6))
        for p, mp in zip(params, master):
            mp.grad = p.grad.float() * clip
            p.grad = None
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for p, mp in zip(params, master):
                p.copy_(mp)
        out.append(loss.item() / math.log(2))
    return out


mode, seed = sys.argv[1].split("@")
t = time.time()
losses = run(mode, int(seed))
print(sys.argv[1], f"{time.time() - t:.0f}s", " ".join(f"{x:.4f}" for x in losses), flush=True)
