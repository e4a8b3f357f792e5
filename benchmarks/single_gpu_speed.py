"""Speed on one GPU: tokens/s, MFU and peak memory of training through run.sh against plain Hugging Face.

Both sides run in the same invocation on the same GPU. The Hugging Face side is the team's baseline
script (``benchmarks/baseline/hf_baseline.py``, unchanged), run as a subprocess for the variants that
match the selected rows plus its bf16 matmul probe (``ANCHOR_ONLY=env_matmul,...,matmul_end``). Our side
runs ``bash cube_examples/finetune_hf_model/run.sh --no-save --disable-validation`` once per row, each
in its own process with a timeout, and reads the per-update JSON lines run.sh writes to ``SPEED_LOG``.

Models are Llama configs with random weights (no downloads; shapes exactly as the baseline's MODEL_A and
MODEL_B), data is random token ids in [3, vocab) (never zeros), the first ``--warmup`` updates
(``--compile-warmup`` for COMPILE=1 rows) are dropped and the medians of the timed updates are reported:

- tokens/s = median over timed updates of tokens / step_s (step_s: the whole update, end to end, as
  the speed log measures it: CUDA events on GPUs);
- fairseq bookkeeping = median(step_s - compute_s) / median(step_s);
- peak GiB = the last update's peak_allocated_bytes / 2**30;
- MFU = flops/token * tokens/s / 989e12 (and / the matmul rate the baseline measured in this run), with
  flops/token as hf_baseline.py counts them: full FT 6N + 12 * layers * hidden * seq, LoRA
  4N + 6 N_lora + 12 * layers * hidden * seq, N = all nn.Linear weights including lm_head.

    python benchmarks/single_gpu_speed.py [--out DIR] [--only NAME,...] [--steps 10] [--budget 540]
    python benchmarks/single_gpu_speed.py --tiny --budget 1500          # CPU smoke run of the whole script

On the GPU machine (no fairseq there: install the wheels of .whl/ first; run.sh gets this Python as PYTHON):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/single_gpu_speed.py --no-loose-logs
Rows the --budget leaves out are listed as skipped: run them in a second command with --only.

Writes ``single_gpu_speed.md`` (the table), ``single_gpu_speed.json`` (every number, the environment) and
``single_gpu_speed_logs.tar.gz`` (all logs) to ``--out`` (default $OUT, else ./benchmark_out), rewritten
after every row so that a run cut short still leaves its results. The loose logs go to ``--out``/logs;
``--no-loose-logs`` keeps them in the work folder only (the GPU machine returns at most 8 files).
"""

import argparse
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "cube_examples" / "finetune_hf_model" / "run.sh"
TINY_LLAMA = REPO / "cube_examples" / "finetune_hf_model" / "model" / "tiny-llama"
BASELINE = REPO / "benchmarks" / "baseline" / "hf_baseline.py"

PEAK_DATASHEET = 989e12  # H100 SXM bf16 dense FLOP/s, as hf_baseline.py
GIB = 2**30

# Shapes exactly as hf_baseline.py's MODEL_A / MODEL_B and its ANCHOR_TINY versions (a unit test checks).
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
LEARNING_RATE = {"full": "1e-5", "lora": "1e-4"}  # the baseline's

# (model, mode) -> the hf_baseline.py variant our rows of that model and mode are compared with.
BASELINE_OF = {
    ("A", "full"): "A1_fp32master_autocast",
    ("A", "lora"): "A5_lora_autocast",
    ("B", "lora"): "B5_lora_autocast_nogc",
}
# (model, mode, data) -> the hf_baseline.py variants on that variable-length data: random order, then grouped
# by length (the one our rows on that data are compared with, in trained tokens/s)
BASELINE_OF_DATA = {
    ("A", "full", "varlen"): ("A1_varlen_random", "A1_varlen_grouped"),
    ("A", "full", "chat"): ("A1_chat_random", "A1_chat_grouped"),
}

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
    # long-tailed lengths shaped like chat data (hf_baseline.sample_lengths): padded, and packed
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
TAIL_LINES = 25
# A line that ends a traceback or states run.sh's / fairseq_ext's one-line error (torchrun may prefix [rankN]: ).
ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?(run\.sh: error:|fairseq_ext: error:|[\w.]*(Error|Exception|Interrupt)\b)")


# ---------------------------------------------------------------------------------------------------
# Arithmetic: parameter counts, FLOPs, the speed log summary (pure functions; the unit test covers them)
# ---------------------------------------------------------------------------------------------------
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


def read_speed_log(path: Path) -> List[dict]:
    """The records of a SPEED_LOG file, by update. A line that is not JSON (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted(records, key=lambda r: r["update"])


def summarize_speed_log(records: List[dict], warmup: int) -> dict:
    """Medians over the updates after the first ``warmup`` (updates are numbered from 1).

    Returns tokens_per_s (median of per-update tokens / step_s), step_median_s, compute_median_s,
    bookkeeping_share (median(step_s - compute_s) / median(step_s)), peak_alloc_gib and peak_reserved_gib
    (the last record's peaks; None where the log has none, e.g. on a CPU) and timed_updates.
    Raises ValueError when no update is left after the warm-up.
    """
    records = sorted(records, key=lambda r: r["update"])
    timed = [r for r in records if r["update"] > warmup]
    if not timed:
        raise ValueError(f"the speed log has {len(records)} updates, none after the {warmup} warm-up updates")
    step = [float(r["step_s"]) for r in timed]
    compute = [float(r["compute_s"]) for r in timed]
    last = records[-1]
    peak = last.get("peak_allocated_bytes")
    reserved = last.get("peak_reserved_bytes")
    return dict(
        tokens_per_s=statistics.median(r["tokens"] / r["step_s"] for r in timed),
        step_median_s=statistics.median(step),
        compute_median_s=statistics.median(compute),
        bookkeeping_share=statistics.median(s - c for s, c in zip(step, compute)) / statistics.median(step),
        peak_alloc_gib=None if peak is None else peak / GIB,
        peak_reserved_gib=None if reserved is None else reserved / GIB,
        tokens_per_update=statistics.median(r["tokens"] for r in timed),
        trained_tokens_per_s=statistics.median(r["trained_tokens"] / r["step_s"] for r in timed)
        if all("trained_tokens" in r for r in timed)
        else None,
        timed_updates=len(timed),
        step_s=step,
        compute_s=compute,
    )


def measured_matmul(baseline: dict) -> Optional[float]:
    """The bf16 matmul FLOP/s the baseline measured at its start (median of its batches, as its own table)."""
    rates = (baseline or {}).get("env_matmul", {}).get("matmul_bf16_flops")
    return statistics.median(rates) if rates else None


# ---------------------------------------------------------------------------------------------------
# Processes: run one command with a timeout; on timeout end it and every process it started
# ---------------------------------------------------------------------------------------------------
def descendants(pid: int) -> List[int]:
    """Process ids below ``pid`` (children, grandchildren...), read from /proc. torchrun starts its workers
    in new sessions, so ending the process group alone would leave them on the GPU."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def end_tree(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the process and its descendants (torchrun then stops its workers); SIGKILL what still runs
    after ``grace_s``."""
    pids = [proc.pid] + descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and (proc.poll() is None or any(alive(pid) for pid in pids[1:])):
            time.sleep(0.1)
        pids = [pid for pid in pids if alive(pid)]
        if not pids:
            break
    proc.wait()


def run_logged(cmd: List[str], env: dict, log: Path, timeout: float, header: str = "") -> dict:
    """Run ``cmd`` with stdout and stderr into ``log``; return {'rc', 'timed_out', 'wall_s'}."""
    start = time.time()
    Path(log).write_text(header)
    with open(log, "a") as f:  # O_APPEND: the child's lines and ours both land at the end
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            end_tree(proc)
            rc, timed_out = proc.returncode, True
            f.write(f"\n[single_gpu_speed] killed after the {timeout:.0f} s timeout\n")
    return {"rc": rc, "timed_out": timed_out, "wall_s": time.time() - start}


def failure_excerpt(log: Path, at_error: bool = True, lines: int = TAIL_LINES) -> Tuple[str, str]:
    """(the last error line, the ``lines`` log lines ending with it) of a failed run; ('', the last lines)
    when it has no error line or not ``at_error`` (a run killed at its timeout). A worker's exception comes
    before torchrun's own ChildFailedError report, which says nothing about it."""
    try:
        text = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return "", ""
    errors = [
        i for i, line in enumerate(text) if at_error and ERROR_LINE.match(line) and "ChildFailedError" not in line
    ]
    end = errors[-1] + 1 if errors else len(text)
    return (text[errors[-1]].strip() if errors else ""), "\n".join(text[max(0, end - lines) : end])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# Inputs of our rows: a config-only model folder and a random-token dataset
# ---------------------------------------------------------------------------------------------------
def write_model_folder(folder: Path, shape: dict, seq: int) -> Path:
    """A LlamaConfig with ``shape`` (untied, no cache) and the shipped tiny tokenizer (used for its pad/eos
    ids only); no weight files, so fairseq_ext initialises the model from the config under the seed."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], seq))
    LlamaConfig(**config, tie_word_embeddings=False, use_cache=False).save_pretrained(folder)
    for file in TINY_LLAMA.iterdir():
        if file.is_file() and file.name != "config.json":
            shutil.copy(file, folder / file.name)
    return folder


def baseline_module():
    """hf_baseline.py as a module (its length distributions are the data of both sides)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_baseline", BASELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_dataset(
    folder: Path, vocab: int, seq: int, train_rows: int, valid_rows: int = 4, seed: int = 0, kind: str = "fixed"
) -> Path:
    """A save_to_disk DatasetDict with one column ``input_ids``: rows of ids uniform in [3, vocab) (0-2 are the
    tokenizer's pad/bos/eos), of exactly ``seq`` ids (``fixed``), of lengths uniform in [seq/8, seq]
    (``varlen``) or long-tailed as chat data (``chat``): the lengths of the baseline's ``sample_lengths``.
    The ``disk`` type trains on all tokens when there is no labels column."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    sample_lengths = baseline_module().sample_lengths

    def rows_of(count):
        return [rng.integers(3, vocab, size=n).tolist() for n in sample_lengths(kind, count, seq, rng)]

    splits = {
        split: datasets.Dataset.from_dict({"input_ids": rows_of(rows)})
        for split, rows in (("train", train_rows), ("valid", valid_rows))
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------
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


class Benchmark:
    def __init__(self, args, rows: List[dict]):
        self.args = args
        self.rows = rows
        self.seq = TINY_SEQ if args.tiny else SEQ
        self.shapes = {"A": TINY_MODEL_A, "B": TINY_MODEL_B} if args.tiny else {"A": MODEL_A, "B": MODEL_B}
        self.out = args.out
        self.work = args.work
        self.logs = (self.work if args.no_loose_logs else self.out) / "logs"
        self.start = time.time()
        self.baseline: dict = {}
        self.baseline_status = "not run"
        self.results: List[dict] = []
        self._datasets: Dict[Tuple[int, str], Path] = {}
        self._models: Dict[str, Path] = {}
        # Each (vocab, data kind) dataset holds enough rows for the longest row that uses it, in one epoch
        # (a packed row takes about two samples of the varlen data).
        self._rows_needed: Dict[Tuple[int, str], int] = {}
        for row in rows:
            key = (self.shapes[row["model"]]["vocab_size"], row["data"])
            need = ((self.warmup(row) + args.steps) * row["mb"] * row["accu"] + row["mb"]) * (
                SAMPLES_PER_PACKED_ROW[row["data"]] if row["pack"] else 1
            )
            self._rows_needed[key] = max(self._rows_needed.get(key, 0), need)

    def remaining(self) -> float:
        return self.args.budget - (time.time() - self.start)

    def warmup(self, row: dict) -> int:
        return self.args.compile_warmup if row["compile"] else self.args.warmup

    def log(self, message: str) -> None:
        print(f"[single_gpu_speed {time.time() - self.start:6.0f}s] {message}", flush=True)

    # ---- the Hugging Face side ----
    def run_baseline(self) -> None:
        keys = {(r["model"], r["mode"]) for r in self.rows if r["data"] == "fixed"}
        variants = [variant for key, variant in BASELINE_OF.items() if key in keys]
        data_keys = {(r["model"], r["mode"], r["data"]) for r in self.rows}
        variants += [v for key, pair in BASELINE_OF_DATA.items() if key in data_keys for v in pair]
        folder = self.logs / "baseline"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in ("anchor_log.txt", "anchor_results.json", "anchor_table.md"):
            (folder / stale).unlink(missing_ok=True)  # the baseline appends to its log
        budget = min(self.args.baseline_budget, self.remaining())
        env = dict(
            os.environ,
            OUT=str(folder),
            PYTHONUNBUFFERED="1",
            ANCHOR_BUDGET_S=str(int(budget)),
            ANCHOR_ONLY=",".join(["env_matmul", *variants, "matmul_end"]),
            ANCHOR_STEPS=str(self.args.steps),
        )
        env.pop("ANCHOR_TINY", None)
        if self.args.tiny:
            env["ANCHOR_TINY"] = "1"
        self.log(f"HF baseline: {env['ANCHOR_ONLY']} (budget {budget:.0f} s)")
        run = run_logged([sys.executable, str(BASELINE)], env, folder / "stdout.log", budget + 60)
        results_file = folder / "anchor_results.json"
        if results_file.is_file():
            self.baseline = json.loads(results_file.read_text())
        self.baseline_status = ("timed out" if run["timed_out"] else f"rc {run['rc']}") + f" in {run['wall_s']:.0f} s"
        self.log(f"HF baseline done: {self.baseline_status}")
        for variant in variants:
            self.results.append(self.baseline_row(variant))

    def baseline_row(self, variant: str) -> dict:
        of = {value: (*key, "fixed") for key, value in BASELINE_OF.items()}
        of.update({value: key for key, pair in BASELINE_OF_DATA.items() for value in pair})
        model, mode, data = of[variant]
        result = dict(name=variant, source="hf", model=model, mode=mode, data=data)
        record = self.baseline.get(variant)
        best = (record or {}).get("best")
        if best is None:
            status = (record or {}).get("status", f"no result (baseline {self.baseline_status})")
            attempts = (record or {}).get("attempts", [])
            reasons = "; ".join(f"mb {a.get('mb')}: {a.get('status')} {a.get('error', '')[:200]}" for a in attempts)
            return dict(
                result,
                status="failed",
                reason=f"{status}{': ' + reasons if reasons else ''}",
                tail=failure_excerpt(self.logs / "baseline" / "stdout.log")[1],
            )
        matmul = measured_matmul(self.baseline)
        return dict(
            result,
            status="ok",
            note=(record.get("desc") or "")[:120],
            mb=best["mb"],
            tokens_per_s=best["tokens_per_s"],
            mfu_989=best["mfu_989"],
            mfu_measured=mfu(best["flops_per_token"], best["tokens_per_s"], matmul),
            peak_alloc_gib=best["peak_alloc_GiB"],
            peak_reserved_gib=best["peak_reserved_GiB"],
            flops_per_token=best["flops_per_token"],
            step_median_s=best["step_median_s"],
            loss_last=best.get("loss_last"),
            n_linear=best.get("n_linear_incl_lm_head"),
            n_lora=best.get("n_lora"),
        )

    # ---- our side ----
    def model_folder(self, model: str) -> Path:
        if model not in self._models:
            self._models[model] = write_model_folder(self.work / "models" / model, self.shapes[model], self.seq)
        return self._models[model]

    def dataset(self, vocab: int, kind: str = "fixed") -> Path:
        key = (vocab, kind)
        if key not in self._datasets:
            folder = self.work / "data" / f"random_v{vocab}_s{self.seq}_{kind}"
            self._datasets[key] = write_dataset(folder, vocab, self.seq, self._rows_needed[key], kind=kind)
        return self._datasets[key]

    def run_row(self, row: dict) -> dict:
        shape = self.shapes[row["model"]]
        warmup = self.warmup(row)
        result = dict(
            name=row["name"],
            source="ours",
            model=row["model"],
            mode=row["mode"],
            mb=row["mb"],
            precision=row["precision"],
            compile=row["compile"],
            recompute=row["recompute"],
            data=row["data"],
            pack=row["pack"],
            zero=row["zero"],
            accu=row["accu"],
            in_backward=row.get("in_backward"),
            states=row.get("states"),
            warmup=warmup,
            steps=self.args.steps,
            log=f"logs/{row['name']}.log",
        )
        left = self.remaining()
        need = MIN_START_S[int(bool(row["compile"]))]
        if left < need:
            self.log(f"SKIP {row['name']}: {left:.0f} s of the {self.args.budget:.0f} s budget left, it needs {need}")
            return dict(result, status="skipped", reason=f"out of time budget ({left:.0f} s left, needs {need} s)")
        timeout = min(row["timeout"], left)
        run_dir = self.work / "runs" / row["name"]
        shutil.rmtree(run_dir, ignore_errors=True)  # the speed log appends: start from nothing
        speed_log = run_dir / "speed.jsonl"
        settings = dict(
            MODEL_ARCH="hf_auto_causal_lm",
            HUGGINGFACE_MODEL_NAME_OR_PATH=str(self.model_folder(row["model"])),
            DATASET_TYPE="disk",
            DATASET_PATH=str(self.dataset(shape["vocab_size"], row["data"])),
            SEQUENCE_LENGTH=str(self.seq),
            BATCH_SIZE=str(row["mb"]),
            GRADIENT_ACCU_NUM=str(row["accu"]),
            MAX_STEPS=str(warmup + self.args.steps),
            WARMUP_STEPS="0",
            LEARNING_RATE=LEARNING_RATE[row["mode"]],
            LOG_INTERVAL="10",
            LOG_FORMAT="json",
            EVALUATE="0",
            OUTPUT_DIR=str(run_dir),
            PRECISION=row["precision"],
            COMPILE=str(row["compile"]),
            USE_LORA="1" if row["mode"] == "lora" else "0",
            LORA_CONFIG=LORA_CONFIG if row["mode"] == "lora" else "",
            RECOMPUTE_MODULE_NAMES=row["recompute"],
            SPEED_LOG=str(speed_log),
            SEED="1",
            PACK_SEQUENCES=str(int(bool(row["pack"]))),
            NPROC_PER_NODE="1",
            NNODES="1",
            NODE_RANK="0",
            PLAN_NGPUS="1",
            USE_ZERO=str(row["zero"]),
            PLAN_FILE="",
            CUBE_SCALING_FACTOR="",
            MASTER_PORT=str(free_port()),
        )
        if row.get("in_backward") is not None:
            settings.update(CLIP_NORM="0", OPTIMIZER_IN_BACKWARD=str(row["in_backward"]))
        if row.get("states"):
            settings.update(OPTIMIZER_STATES=row["states"])
        env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", **settings)
        cmd = ["bash", str(RUN_SH), "--no-save", "--disable-validation", *row.get("args", [])]
        header = "".join(f"# {k}={v}\n" for k, v in settings.items()) + f"# {' '.join(cmd)}\n"
        log = self.logs / f"{row['name']}.log"
        if row.get("mem_per_gpu"):
            planned = self.compile_plan(row, env, run_dir)
            if "plan_file" not in planned:
                return dict(result, status="failed", **planned)
            result.update(planned)
            env.update(PLAN_FILE=planned["plan_file"], RECOMPUTE_MODULE_NAMES="")
        self.log(f"START {row['name']} (timeout {timeout:.0f} s)")
        run = run_logged(cmd, env, log, timeout, header)
        result.update(rc=run["rc"], wall_s=round(run["wall_s"], 1))
        if speed_log.is_file():
            shutil.copy(speed_log, self.logs / f"{row['name']}.speed.jsonl")
        result["loss_last"] = last_loss(log)
        if run["timed_out"]:
            result.update(status="failed", reason=f"timed out after {timeout:.0f} s")
        elif run["rc"] != 0:
            result.update(status="failed", reason=f"run.sh exited with {run['rc']}")
        elif not speed_log.is_file():
            result.update(status="failed", reason="run.sh wrote no SPEED_LOG (does this run.sh support SPEED_LOG?)")
        if result.get("status") is None:
            try:
                result.update(summarize_speed_log(read_speed_log(speed_log), warmup), status="ok")
            except (ValueError, KeyError, TypeError, ZeroDivisionError) as err:
                result.update(status="failed", reason=f"speed log unusable: {type(err).__name__}: {err}")
        if result["status"] != "ok":
            error, result["tail"] = failure_excerpt(log, at_error=not run["timed_out"])
            if error:
                result["reason"] += f": {error}"
            self.log(f"FAILED {row['name']}: {result['reason']}")
            return result
        if result["timed_updates"] < self.args.steps:
            result["note"] = f"only {result['timed_updates']} of {self.args.steps} timed updates logged"
        fpt = flops_per_token(shape, row["mode"], self.seq)
        result.update(
            flops_per_token=fpt,
            n_linear=linear_params(shape),
            n_lora=lora_params(shape) if row["mode"] == "lora" else 0,
            mfu_989=mfu(fpt, result["tokens_per_s"], PEAK_DATASHEET),
            mfu_measured=mfu(fpt, result["tokens_per_s"], measured_matmul(self.baseline)),
        )
        if row["data"] != "fixed" and result.get("trained_tokens_per_s"):
            result["note"] = "; ".join(
                filter(
                    None,
                    [
                        result.get("note"),
                        (
                            f"{row['data']} data{', packed' if row['pack'] else ', padded'}: "
                            f"{result['trained_tokens_per_s']:,.0f} trained tokens/s"
                        ),
                    ],
                )
            )
        self.log(f"END {row['name']}: {result['tokens_per_s']:,.0f} tokens/s in {run['wall_s']:.0f} s")
        return result

    def compile_plan(self, row: dict, env: dict, run_dir: Path) -> dict:
        """``run.sh compile`` for the row's settings and MEM_PER_GPU: the plan file and its predictions."""
        log = self.logs / f"{row['name']}.plan.log"
        run = run_logged(
            ["bash", str(RUN_SH), "compile"],
            dict(env, MEM_PER_GPU=str(row["mem_per_gpu"]), RECOMPUTE_MODULE_NAMES=""),
            log,
            180,
        )
        plan_file = run_dir / "plan.json"
        text = log.read_text()
        if run["rc"] != 0 or not plan_file.is_file():
            return dict(reason=f"run.sh compile failed (rc {run['rc']})", tail=text.splitlines()[-TAIL_LINES:])
        chosen = re.search(r"chosen plan: (.*?); peak memory ([\d.]+) GB.*?step ([\d.]+) s", text)
        tensors = re.search(r"chosen plan: .*?; peak memory [\d.]+ GB \(tensors ([\d.]+)", text)
        planned = dict(plan_file=str(plan_file), plan=json.loads(plan_file.read_text()))
        if chosen:
            planned.update(
                plan_summary=chosen.group(1),
                predicted_peak_gib=float(chosen.group(2)),
                predicted_step_s=float(chosen.group(3)),
            )
        if tensors:  # comparable with the measured peak_alloc_gib (torch.cuda.max_memory_allocated)
            planned.update(predicted_alloc_gib=float(tensors.group(1)))
        self.log(f"PLAN {row['name']}: {planned.get('plan_summary')} (MEM_PER_GPU {row['mem_per_gpu']})")
        return planned

    def compare(self) -> None:
        """Ratio of our tokens/s to the HF row of the same model, mode and data (variable-length data: trained
        tokens/s against HF's batches grouped by length); flag a FLOP count that differs."""
        hf = {
            (r["model"], r["mode"], r["data"]): r
            for r in self.results
            if r["source"] == "hf" and r["status"] == "ok" and not r["name"].endswith("_random")
        }
        for r in self.results:
            ref = hf.get((r["model"], r["mode"], r.get("data", "fixed")))
            if r["source"] != "ours" or r["status"] != "ok" or ref is None:
                continue
            ours = r["tokens_per_s"] if r["data"] == "fixed" else r.get("trained_tokens_per_s")
            if ours is None:
                continue
            r["ratio_to_hf"] = ours / ref["tokens_per_s"]
            r.setdefault("own_note", r.get("note", ""))  # compare() runs after every row: notes are rebuilt
            notes = [r["own_note"]] if r["own_note"] else []
            if ref["mb"] != r["mb"]:
                notes.append(f"HF ran micro-batch {ref['mb']}")
            if abs(ref["flops_per_token"] - r["flops_per_token"]) > 1e-6 * r["flops_per_token"]:
                notes.append(f"FLOP count differs from HF's ({ref['flops_per_token']:.4g})")
            if notes:
                r["note"] = "; ".join(notes)

    # ---- outputs ----
    def environment(self) -> dict:
        env = dict((self.baseline.get("env_matmul") or {}).get("env") or {})
        driver = {"python": sys.version.split()[0]}
        for dist in ("torch", "transformers", "peft", "datasets", "ve-fairseq", "fairseq", "accelerate"):
            try:
                driver[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        if "gpu" not in env:
            try:
                smi = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                names = smi.stdout.strip().splitlines() if smi.returncode == 0 else []
                env["gpu"] = names[0] if names else "none"
            except (OSError, subprocess.TimeoutExpired):
                env["gpu"] = "none"
        return {"baseline_env": env, "driver_versions": driver}

    def write(self) -> None:
        self.compare()
        environment = self.environment()
        table = render_table(self.results, environment, self.baseline, self.settings())
        (self.out / "single_gpu_speed.md").write_text(table + "\n")
        numbers = dict(
            settings=self.settings(),
            environment=environment,
            matmul_bf16_flops=(self.baseline.get("env_matmul") or {}).get("matmul_bf16_flops"),
            matmul_bf16_flops_end=(self.baseline.get("matmul_end") or {}).get("matmul_bf16_flops"),
            baseline_status=self.baseline_status,
            rows=self.results,
            baseline=self.baseline,
        )
        (self.out / "single_gpu_speed.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
        with tarfile.open(self.out / "single_gpu_speed_logs.tar.gz", "w:gz") as tar:
            if self.logs.is_dir():
                tar.add(self.logs, arcname="logs")

    def settings(self) -> dict:
        return dict(
            tiny=self.args.tiny,
            seq=self.seq,
            steps=self.args.steps,
            warmup=self.args.warmup,
            compile_warmup=self.args.compile_warmup,
            budget_s=self.args.budget,
            elapsed_s=round(time.time() - self.start, 1),
            peak_datasheet=PEAK_DATASHEET,
            shapes=self.shapes,
            lora_config=LORA_CONFIG,
            rows=self.rows,
        )

    def main(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.args.skip_baseline:
            self.run_baseline()
            self.write()
        for row in self.rows:
            try:
                result = self.run_row(row)
            except Exception as err:  # a broken row (e.g. its data could not be written) never stops the others
                result = dict(
                    name=row["name"],
                    source="ours",
                    model=row["model"],
                    mode=row["mode"],
                    mb=row["mb"],
                    precision=row["precision"],
                    compile=row["compile"],
                    recompute=row["recompute"],
                    status="failed",
                    reason=f"{type(err).__name__}: {err}",
                    tail=traceback.format_exc(),
                )
                self.log(f"FAILED {row['name']}: {result['reason']}")
            self.results.append(result)
            self.write()
        print(render_table(self.results, self.environment(), self.baseline, self.settings()), flush=True)
        ours = [r for r in self.results if r["source"] == "ours"]
        return 0 if all(r["status"] == "ok" for r in ours) else 1


def last_loss(log: Path) -> Optional[float]:
    """The last train_inner loss fairseq logged (LOG_FORMAT=json), a sanity check that training ran."""
    loss = None
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if "| train_inner |" in line:
            try:
                loss = float(json.loads(line.split("| train_inner |", 1)[1])["loss"])
            except (ValueError, KeyError):
                continue
    return loss


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_table(results: List[dict], environment: dict, baseline: dict, settings: dict) -> str:
    """The markdown report: a header with the machine, one table row per result (HF row first in each
    model/mode group), then the last log lines of every failed row."""
    env = environment["baseline_env"]
    versions = {k: env.get(k) or environment["driver_versions"].get(k) for k in ("torch", "transformers", "peft")}
    matmul = measured_matmul(baseline)
    end_rates = (baseline.get("matmul_end") or {}).get("matmul_bf16_flops")
    lines = [
        "# Speed on one GPU: fairseq-train (run.sh) against plain Hugging Face (hf_baseline.py)",
        "",
        f"GPU {env.get('gpu', '?')}; torch {versions['torch']}, transformers {versions['transformers']}, "
        f"peft {versions['peft']}; seq {settings['seq']}{' (tiny models)' if settings['tiny'] else ''}; "
        f"{settings['steps']} timed updates after {settings['warmup']} warm-up ({settings['compile_warmup']} "
        f"with COMPILE=1), medians of wall time per update; random weights and random tokens. HF rows: "
        "hf_baseline.py's own recipe (3 warm-up steps, CUDA-event step times).",
        f"Measured bf16 matmul: {_num(matmul and matmul / 1e12, '.1f')} TFLOP/s (baseline's probe at the start; "
        f"{_num(end_rates and statistics.median(end_rates) / 1e12, '.1f')} at its end). MFU counts flops as "
        "hf_baseline.py (recompute not counted). Bookkeeping = median(step - compute) / median(step) of our "
        "updates.",
        "",
        "| run | model | mode | micro-batch | tokens/s | MFU vs 989 | MFU vs measured matmul | peak GiB | "
        "fairseq bookkeeping | vs HF | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = []
    for r in results:
        if (r["model"], r["mode"]) not in order:
            order.append((r["model"], r["mode"]))
    failed = []
    for group in order:
        for r in sorted((r for r in results if (r["model"], r["mode"]) == group), key=lambda r: r["source"] != "hf"):
            model = MODEL_LABELS[r["model"]] + (" (tiny)" if settings["tiny"] else "")
            mode = "full FT" if r["mode"] == "full" else f"LoRA r{LORA_R}"
            if r["source"] == "hf":
                run = f"HF {r['name']}"
            else:
                run = f"ours {r['name']}: PRECISION={r['precision']} COMPILE={r['compile']}" + (
                    f" RECOMPUTE_MODULE_NAMES={r['recompute']}" if r["recompute"] else ""
                )
                run += f" USE_ZERO={r['zero']}" if r.get("zero") else ""
            if r["status"] != "ok":
                lines.append(
                    f"| {run} | {model} | {mode} | {r.get('mb', '-')} | {r['status']} | - | - | - | - | - | "
                    f"{r.get('reason', '')[:200].replace('|', '/')} |"
                )
                if r.get("tail"):
                    failed.append(r)
                continue
            notes = r.get("note", "")
            if r.get("plan_summary"):
                notes = "; ".join(
                    filter(
                        None,
                        [
                            notes,
                            f"compile pass: {r['plan_summary']}, predicted peak "
                            f"{r['predicted_peak_gib']:.1f} GiB"
                            + (
                                f" (tensors {r['predicted_alloc_gib']:.1f} against the measured allocated peak)"
                                if r.get("predicted_alloc_gib")
                                else ""
                            )
                            + f", step {r['predicted_step_s']:.3f} s",
                        ],
                    )
                )
            if r.get("loss_last") is not None and not math.isfinite(r["loss_last"]):
                notes = "; ".join(filter(None, [notes, "NON-FINITE LOSS"]))
            ratio = f"{r['ratio_to_hf']:.2f}x" if r.get("ratio_to_hf") is not None else "-"
            lines.append(
                f"| {run} | {model} | {mode} | {r['mb']} | {r['tokens_per_s']:,.0f} | {_pct(r['mfu_989'])} | "
                f"{_pct(r.get('mfu_measured'))} | {_num(r.get('peak_alloc_gib'), '.1f')} | "
                f"{_pct(r.get('bookkeeping_share'))} | {ratio} | {notes} |"
            )
    for r in failed:
        lines += ["", f"## {r['name']}: {r['status']} ({r.get('reason', '')})", "", "```", r["tail"], "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or "benchmark_out"),
        help="results folder (default $OUT, else ./benchmark_out)",
    )
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument(
        "--variants",
        type=Path,
        help=f"a JSON list of row dicts that replaces the built-in rows (keys: {', '.join(sorted(ROW_KEYS))})",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny models and seq 128, as hf_baseline.py ANCHOR_TINY=1 (a CPU smoke run of the whole script)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed updates per row (also the baseline's)")
    parser.add_argument("--warmup", type=int, default=5, help="updates dropped before timing")
    parser.add_argument("--compile-warmup", type=int, default=8, help="updates dropped before timing, COMPILE=1 rows")
    parser.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds for everything; rows that would start past it are skipped, and reported so",
    )
    parser.add_argument(
        "--baseline-budget",
        type=float,
        default=300,
        help="at most this many seconds of --budget for the HF baseline (its ANCHOR_BUDGET_S)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="no HF rows, no measured matmul rate")
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch folder for models, data and runs (default: a temporary folder, removed at the end)",
    )
    parser.add_argument(
        "--no-loose-logs",
        action="store_true",
        help="keep row logs only in the tar.gz (the GPU machine returns at most 8 files)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.compile_warmup < 0:
        parser.error("--steps must be positive, --warmup and --compile-warmup non-negative")
    rows = json.loads(args.variants.read_text()) if args.variants else VARIANTS
    try:
        rows = check_rows(rows)
    except ValueError as err:
        parser.error(str(err))
    if args.only:
        wanted = args.only.split(",")
        unknown = [n for n in wanted if n not in {r["name"] for r in rows}]
        if unknown:
            parser.error(f"--only: unknown rows {unknown}; the rows are: {', '.join(r['name'] for r in rows)}")
        rows = [r for r in rows if r["name"] in wanted]
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="single_gpu_speed_")) if temporary else args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        return Benchmark(args, rows).main()
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
