"""What the baseline (hf_baseline.py) runs: the model shapes (toy ones under ANCHOR_TINY=1), the training
variants, and the order the driver runs them in."""

import os

PEAK_DATASHEET = 989e12  # H100 SXM bf16 dense, FLOP/s
SEQ = 2048
TINY = os.environ.get("ANCHOR_TINY") == "1"

# Model shapes.
MODEL_A = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=2048,
)  # TinyLlama-1.1B shape
MODEL_B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=8192,
)  # Llama-3-8B shape
if TINY:
    SEQ = 128
    MODEL_A = dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    MODEL_B = dict(MODEL_A, vocab_size=2000)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> spec.  kind: full | lora.  weights: fp32 | bf16.
VARIANTS = {
    "A1_fp32master_autocast": dict(
        model="A",
        kind="full",
        weights="fp32",
        autocast=True,
        gc=False,
        compile=False,
        mbs=[8, 4, 2, 1],
        timeout=150,
        desc="HF-Trainer style: fp32 weights + autocast bf16, fused AdamW fp32, no GC",
    ),
    "A2_fp32master_autocast_gc": dict(
        model="A",
        kind="full",
        weights="fp32",
        autocast=True,
        gc=True,
        compile=False,
        mbs=[8, 4, 2, 1],
        timeout=150,
        desc="as A1 + model.gradient_checkpointing_enable()",
    ),
    "A3_bf16_pure": dict(
        model="A",
        kind="full",
        weights="bf16",
        autocast=False,
        gc=False,
        compile=False,
        mbs=[8, 4, 2, 1],
        timeout=150,
        desc="pure bf16 weights + fused AdamW on bf16 params/states, no GC",
    ),
    "A5_lora_autocast": dict(
        model="A",
        kind="lora",
        weights="bf16",
        autocast=True,
        gc=False,
        compile=False,
        mbs=[8, 4, 2, 1],
        timeout=150,
        desc="peft LoRA r16/a32 all linear, bf16 frozen base, peft-default fp32 adapters, autocast bf16, no GC",
    ),
    "B5_lora_autocast_nogc": dict(
        model="B",
        kind="lora",
        weights="bf16",
        autocast=True,
        gc=False,
        compile=False,
        mbs=[2, 1],
        timeout=200,
        desc="8B: peft LoRA r16/a32 all linear, bf16 frozen base, autocast bf16, no GC",
    ),
    "B5_lora_autocast_gc": dict(
        model="B",
        kind="lora",
        weights="bf16",
        autocast=True,
        gc=True,
        compile=False,
        mbs=[2, 1],
        timeout=200,
        desc="8B: as above + gradient checkpointing",
    ),
    "A4_bf16_pure_compile": dict(
        model="A",
        kind="full",
        weights="bf16",
        autocast=False,
        gc=False,
        compile=True,
        mbs=None,
        timeout=330,
        desc="A3 + torch.compile(model) (default mode)",
    ),
    "A5b_lora_noautocast": dict(
        model="A",
        kind="lora",
        weights="bf16",
        autocast=False,
        gc=False,
        compile=False,
        mbs=[8, 4, 2, 1],
        timeout=150,
        desc="as A5 but without autocast (bf16 base, fp32 adapters)",
    ),
}
# Variable-length data (hf_lengths.sample_lengths): the HF Trainer's way, each batch padded to its longest sample,
# in random order or grouped by length (its LengthGroupedSampler: mega-batches of 50 batches sorted by length);
# tokens/s counts trained tokens (no padding), as our variable-length rows do.
for _data in ("varlen", "chat"):
    for _order in ("random", "grouped"):
        VARIANTS[f"A1_{_data}_{_order}"] = dict(
            VARIANTS["A1_fp32master_autocast"],
            mbs=[8, 4],
            data=_data,
            order=_order,
            desc=f"as A1, {_data} lengths, padded per batch, {_order} order",
        )
ORDER = [
    "env_matmul",
    "A1_varlen_random",
    "A1_varlen_grouped",
    "A1_chat_random",
    "A1_chat_grouped",
    "A1_fp32master_autocast",
    "A2_fp32master_autocast_gc",
    "A3_bf16_pure",
    "A5_lora_autocast",
    "B5_lora_autocast_nogc",
    "B5_lora_autocast_gc",
    "A4_bf16_pure_compile",
    "A5b_lora_noautocast",
    "matmul_end",
]
COMPILE_LIMIT_S = 180.0
