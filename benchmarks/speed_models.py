"""The speed benchmarks' model shapes (Llama 1.1B and 8B, and tiny versions for the CPU) and their arithmetic:
parameter counts, training FLOPs per token as hf_baseline.py counts them, and MFU."""

import statistics
from typing import Dict, Iterable, Optional

PEAK_DATASHEET = 989e12  # H100 SXM bf16 dense FLOP/s, as hf_baseline.py

# Shapes exactly as the baseline's MODEL_A / MODEL_B (baseline/hf_variants.py) and its ANCHOR_TINY versions (a unit
# test checks).
SEQ = 2048
MODEL_A = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=2048,
)  # TinyLlama-1.1B
MODEL_B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=8192,
)  # Llama-3-8B
TINY_SEQ = 128
TINY_MODEL_A = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    vocab_size=1000,
    max_position_embeddings=256,
)
TINY_MODEL_B = dict(TINY_MODEL_A, vocab_size=2000)
MODEL_LABELS = {"A": "Llama 1.1B", "B": "Llama-3 8B"}

LORA_R = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_CONFIG = f"r={LORA_R} lora_alpha=32 lora_dropout=0.0 target_modules={','.join(LORA_TARGETS)}"


def linear_shapes(shape: dict) -> Dict[str, tuple]:
    """(in, out) features of each nn.Linear of one Llama decoder layer, by module name."""
    hidden, ffn = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    q_out = shape["num_attention_heads"] * head_dim
    kv_out = shape["num_key_value_heads"] * head_dim
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, ffn),
        "up_proj": (hidden, ffn),
        "down_proj": (ffn, hidden),
    }


def linear_params(shape: dict) -> int:
    """N: the weights of all nn.Linear modules, lm_head included (untied), without building the model."""
    per_layer = sum(i * o for i, o in linear_shapes(shape).values())
    return shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * shape["hidden_size"]


def lora_params(shape: dict, r: int = LORA_R, targets: Iterable[str] = LORA_TARGETS) -> int:
    """N_lora: LoRA A (r x in) and B (out x r) of every targeted linear of every layer."""
    per_layer = sum(r * (i + o) for name, (i, o) in linear_shapes(shape).items() if name in set(targets))
    return shape["num_hidden_layers"] * per_layer


def flops_per_token(shape: dict, mode: str, seq: int) -> float:
    """Training FLOPs per token as hf_baseline.py counts them (causal attention counted as full,
    recompute not counted): full 6N + attention; LoRA 4N (frozen base: forward and input grads) + 6 N_lora."""
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
    n = linear_params(shape)
    if mode == "full":
        return 6 * n + attention
    if mode == "lora":
        return 4 * n + 6 * lora_params(shape) + attention
    raise ValueError(f"mode must be full or lora, got {mode!r}")


def mfu(flops_per_tok: float, tokens_per_s: Optional[float], peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved FLOP/s over ``peak``; None when either is unknown."""
    if tokens_per_s is None or not peak:
        return None
    return flops_per_tok * tokens_per_s / peak


def measured_matmul(baseline: dict) -> Optional[float]:
    """The bf16 matmul FLOP/s the baseline measured at its start (median of its batches, as its own table)."""
    rates = (baseline or {}).get("env_matmul", {}).get("matmul_bf16_flops")
    return statistics.median(rates) if rates else None
