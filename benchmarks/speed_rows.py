"""The rows of benchmarks/single_gpu_speed.py: the run.sh settings of each (model, mode, micro-batch,
PRECISION, COMPILE...), the keys a row may have and their defaults (``check_rows``)."""

from typing import List

LEARNING_RATE = {"full": "1e-5", "lora": "1e-4"}  # the baseline's

# Our rows: one dict each. precision: run.sh PRECISION; compile: run.sh COMPILE; recompute:
# RECOMPUTE_MODULE_NAMES; timeout: seconds for the whole run.sh process (model init and compile included).
VARIANTS = [
    dict(name="1.1B-full-bf16", model="A", mode="full", mb=8, precision="bf16", compile=0, timeout=180),
    dict(name="1.1B-full-bf16master", model="A", mode="full", mb=8, precision="bf16-master", compile=0, timeout=180),
    dict(
        name="1.1B-full-bf16master-compile",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
    ),
    dict(
        name="1.1B-full-bf16master-compile-logitsloss",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
        args=["--lm-loss-logits"],
    ),
    dict(
        name="1.1B-full-bf16master-compile-recompute",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        recompute="LlamaDecoderLayer",
        timeout=300,
    ),
    dict(name="1.1B-full-bf16-compile", model="A", mode="full", mb=8, precision="bf16", compile=1, timeout=300),
    # data of lengths uniform in [seq/8, seq]: padded batches against PACK_SEQUENCES=1 (compare trained tokens/s)
    dict(
        name="1.1B-full-bf16master-compile-varlen",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
        data="varlen",
    ),
    dict(
        name="1.1B-full-bf16master-compile-varlen-packed",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
        data="varlen",
        pack=1,
    ),
    # long-tailed lengths shaped like chat data (baseline/hf_lengths.py's sample_lengths): padded, and packed
    dict(
        name="1.1B-full-bf16master-compile-chat",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
        data="chat",
    ),
    dict(
        name="1.1B-full-bf16master-compile-chat-packed",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
        data="chat",
        pack=1,
    ),
    dict(
        name="1.1B-full-bf16master-compile-workers2",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
        args=["--num-workers", "2"],
    ),
    dict(
        name="1.1B-full-bf16master-compile-mb16",
        model="A",
        mode="full",
        mb=16,
        precision="bf16-master",
        compile=1,
        timeout=300,
    ),
    dict(
        name="1.1B-lora-bf16master-compile",
        model="A",
        mode="lora",
        mb=8,
        precision="bf16-master",
        compile=1,
        timeout=300,
    ),
    dict(
        name="8B-lora-bf16master-compile", model="B", mode="lora", mb=2, precision="bf16-master", compile=1, timeout=420
    ),
    dict(
        name="8B-lora-bf16master-compile-varlen-packed",
        model="B",
        mode="lora",
        mb=2,
        precision="bf16-master",
        compile=1,
        timeout=420,
        data="varlen",
        pack=1,
    ),
    dict(
        name="8B-lora-bf16master-compile-mb3",
        model="B",
        mode="lora",
        mb=3,
        precision="bf16-master",
        compile=1,
        timeout=420,
    ),
    dict(
        name="8B-lora-bf16master-compile-mb4",
        model="B",
        mode="lora",
        mb=4,
        precision="bf16-master",
        compile=1,
        timeout=420,
    ),
    # mem_per_gpu: `run.sh compile` chooses the plan (recompute) for this budget (GB), the run trains with it
    dict(
        name="8B-full-bf16lean-plan-compile",
        model="B",
        mode="full",
        mb=2,
        precision="bf16-lean",
        compile=1,
        mem_per_gpu=74,
        timeout=420,
    ),
    # zero: USE_ZERO; on one GPU a level >= 1 trains through FSDP2 over one rank. With mem_per_gpu, the compile
    # pass's predicted peak and step for the same settings (plain rows too, to compare)
    dict(
        name="1.1B-full-bf16master-compile-zero1",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        zero=1,
        mem_per_gpu=74,
        timeout=300,
    ),
    dict(
        name="1.1B-full-bf16master-compile-plan",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        mem_per_gpu=74,
        timeout=300,
    ),
    dict(
        name="8B-full-bf16lean-plan-compile-zero3",
        model="B",
        mode="full",
        mb=2,
        precision="bf16-lean",
        compile=1,
        zero=3,
        mem_per_gpu=78,
        timeout=420,
    ),
    dict(
        name="1.1B-full-bf16master-compile-zero3",
        model="A",
        mode="full",
        mb=8,
        precision="bf16-master",
        compile=1,
        zero=3,
        mem_per_gpu=74,
        timeout=300,
    ),
    # float8 linear layers in the decoder blocks (PRECISION=fp8: bf16-master's storage; fp8-lean: bf16-lean's)
    dict(name="1.1B-full-fp8-compile", model="A", mode="full", mb=8, precision="fp8", compile=1, timeout=300),
    # variants of the float8 layers (runtime/float8.py): fast accumulation in every float8 matmul; q/o (2048 x 2048)
    # left in bf16
    dict(
        name="1.1B-full-fp8-compile-fastaccum",
        model="A",
        mode="full",
        mb=8,
        precision="fp8",
        compile=1,
        timeout=300,
        args=["--float8-recipe", "tensorwise-fast-accum"],
    ),
    dict(
        name="1.1B-full-fp8-compile-minwidth2048",
        model="A",
        mode="full",
        mb=8,
        precision="fp8",
        compile=1,
        timeout=300,
        args=["--float8-min-width", "2048"],
    ),
    dict(name="8B-lora-fp8-compile", model="B", mode="lora", mb=2, precision="fp8", compile=1, timeout=420),
    dict(
        name="8B-full-fp8lean-plan-compile",
        model="B",
        mode="full",
        mb=2,
        precision="fp8-lean",
        compile=1,
        mem_per_gpu=74,
        timeout=420,
    ),
    # in_backward: the optimizer step inside the backward (OPTIMIZER_IN_BACKWARD=1) against the step after it, both
    # without clipping (CLIP_NORM=0, which it needs): the peak memory without the gradients held to the step
    dict(
        name="8B-full-bf16lean-compile-recompute-clip0",
        model="B",
        mode="full",
        mb=2,
        precision="bf16-lean",
        compile=1,
        recompute="LlamaDecoderLayer",
        in_backward=0,
        timeout=420,
    ),
    dict(
        name="8B-full-bf16lean-compile-recompute-inbwd",
        model="B",
        mode="full",
        mb=2,
        precision="bf16-lean",
        compile=1,
        recompute="LlamaDecoderLayer",
        in_backward=1,
        timeout=420,
    ),
    dict(
        name="8B-full-bf16lean-compile-clip0",
        model="B",
        mode="full",
        mb=2,
        precision="bf16-lean",
        compile=1,
        in_backward=0,
        timeout=420,
    ),
    dict(
        name="8B-full-bf16lean-compile-inbwd",
        model="B",
        mode="full",
        mb=2,
        precision="bf16-lean",
        compile=1,
        in_backward=1,
        timeout=420,
    ),
    # accu: GRADIENT_ACCU_NUM (the plan is chosen for it; memory with accumulation against without)
    dict(
        name="8B-full-bf16lean-plan-compile-accu8",
        model="B",
        mode="full",
        mb=2,
        accu=8,
        precision="bf16-lean",
        compile=1,
        mem_per_gpu=74,
        timeout=480,
    ),
    # states: OPTIMIZER_STATES (torchao's quantized moments, 2 bytes a parameter less than bf16-lean's): the plan
    # chosen for them, without and with accumulation
    dict(
        name="8B-full-bf16lean-8bit-plan-compile",
        model="B",
        mode="full",
        mb=2,
        precision="bf16-lean",
        states="8bit",
        compile=1,
        mem_per_gpu=74,
        timeout=480,
    ),
    dict(
        name="8B-full-bf16lean-8bit-plan-compile-accu8",
        model="B",
        mode="full",
        mb=2,
        accu=8,
        precision="bf16-lean",
        states="8bit",
        compile=1,
        mem_per_gpu=74,
        timeout=480,
    ),
]
ROW_KEYS = {
    "name",
    "model",
    "mode",
    "mb",
    "precision",
    "compile",
    "recompute",
    "timeout",
    "args",
    "mem_per_gpu",
    "data",
    "pack",
    "zero",
    "accu",
    "in_backward",
    "states",
}
# rows of exactly seq tokens; of lengths uniform in [seq/8, seq]; or long-tailed as chat data (padding)
DATA_KINDS = ("fixed", "varlen", "chat")
SAMPLES_PER_PACKED_ROW = {"fixed": 1, "varlen": 3, "chat": 8}  # more than the mean, for the dataset's size
MIN_START_S = {0: 60, 1: 120}  # a row (by COMPILE) is not started with less budget than this left, as the baseline


def check_rows(rows: List[dict]) -> List[dict]:
    """Rows with their defaults filled in; ValueError naming the row for a bad one."""
    out = []
    for row in rows:
        name = row.get("name", "?")
        unknown = set(row) - ROW_KEYS
        if unknown:
            raise ValueError(f"row {name}: unknown keys {sorted(unknown)}; known: {sorted(ROW_KEYS)}")
        missing = {"name", "model", "mode", "mb", "precision"} - set(row)
        if missing:
            raise ValueError(f"row {name}: missing {sorted(missing)}")
        if row["model"] not in ("A", "B") or row["mode"] not in ("full", "lora"):
            raise ValueError(
                f"row {name}: model must be A or B and mode full or lora, got {row['model']!r}, {row['mode']!r}"
            )
        if row.get("data", "fixed") not in DATA_KINDS:
            raise ValueError(f"row {name}: data must be one of {DATA_KINDS}, got {row['data']!r}")
        out.append(dict(dict(compile=0, recompute="", timeout=240, data="fixed", pack=0, zero=0, accu=1), **row))
    names = [r["name"] for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique, got {names}")
    return out
