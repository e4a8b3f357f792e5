"""The compile pass: profile the model, search plans, explain the choice, write plan.json.

``compile_plan`` is the recipe ``run.sh compile`` and ``scripts/plan_report.py`` run: load the config
(no weights), profile it on fake tensors for every tp degree the search may use, search, and return the
chosen Plan with its ``model_fingerprint`` (model sizes, sequence length, batch settings, precision) and
the costed candidates. ``format_report`` prints them as a table.
"""

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

from ..errors import UserInputError
from .cost import GIB, Hardware, Workload
from .model_spec import RunSettings, spec_of
from .plan import Plan
from .profile import Lora, load_config, profile_model
from .search import OVER_MEMORY, Fixed, SearchResult, search, smallest_fit

MAX_SUGGESTED_NGPUS = 64  # the "or use PLAN_NGPUS=N" hint looks this far
CLOSEST_SHOWN = 3  # plans a refusal shows


@dataclass(frozen=True)
class CompileSettings:
    """run.sh's variables that the compile pass reads (names in the comments)."""

    model: str  # HUGGINGFACE_MODEL_NAME_OR_PATH: a folder with config.json, or the file
    plan_ngpus: int  # PLAN_NGPUS
    mem_per_gpu: float  # MEM_PER_GPU, GiB per GPU
    scaling_factor: int = 1  # CUBE_SCALING_FACTOR
    batch_size: int = 32  # BATCH_SIZE
    seq_len: int = 512  # SEQUENCE_LENGTH
    grad_accu: int = 1  # GRADIENT_ACCU_NUM
    zero: bool = False  # USE_ZERO
    zero_n_groups: int = 1  # ZERO_N_GROUPS
    precision: str = "fp32"  # PRECISION
    attn_implementation: str = "sdpa"
    compiled: bool = False  # COMPILE: decoder layers under torch.compile (they keep fewer activations)
    lora_config: Optional[str] = None  # LORA_CONFIG when USE_LORA=1: only the adapters train
    packing: bool = False  # PACK_SEQUENCES
    sequence_parallel: bool = False  # SEQUENCE_PARALLEL
    fixed: Fixed = field(default_factory=Fixed)
    hardware: Hardware = field(default_factory=Hardware)

    def run_settings(self) -> RunSettings:
        """What the runtime will run with (a causal LM, the compile pass's head)."""
        return RunSettings(
            precision=self.precision,
            compiled=self.compiled,
            lora=self.lora_config is not None,
            packing=self.packing,
            sequence_parallel=self.sequence_parallel,
            batch_size=self.batch_size,
        )


@dataclass(frozen=True)
class Compiled:
    plan: Optional[Plan]  # None: nothing fits (``error`` says what would)
    result: SearchResult
    seconds: float
    error: str = ""


def check_settings(s: CompileSettings) -> None:
    """Raise UserInputError for settings no search can use."""
    for name in ("plan_ngpus", "scaling_factor", "batch_size", "seq_len", "grad_accu", "zero_n_groups"):
        value = getattr(s, name)
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    if not s.mem_per_gpu > 0:
        raise UserInputError(f"MEM_PER_GPU must be a positive number of GB per GPU, got {s.mem_per_gpu!r}")
    if s.zero and s.scaling_factor % s.zero_n_groups:
        raise UserInputError(f"ZERO_N_GROUPS {s.zero_n_groups} does not divide CUBE_SCALING_FACTOR {s.scaling_factor}")


def model_fingerprint(config, s: CompileSettings) -> str:
    """16 hex digits identifying what a plan was compiled for: the model's sizes, SEQUENCE_LENGTH,
    BATCH_SIZE, GRADIENT_ACCU_NUM, PRECISION and COMPILE. A saved plan whose fingerprint differs is stale."""
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "head_dim",
        "tie_word_embeddings",
    )
    data = {key: getattr(config, key, None) for key in keys}
    data.update(seq_len=s.seq_len, batch_size=s.batch_size, grad_accu=s.grad_accu, precision=s.precision)
    if s.compiled:  # absent when off, so plans compiled before the setting existed stay current
        data.update(compiled=True)
    if s.sequence_parallel:
        data.update(sequence_parallel=True)
    if s.lora_config is not None:
        lora = Lora.from_config(s.lora_config, getattr(config, "model_type", ""))
        data.update(lora_rank=lora.rank, lora_targets=sorted(lora.targets))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def check_plan_is_current(
    plan: Plan,
    config,
    seq_len: int,
    batch_size: int,
    grad_accu: int,
    precision: str,
    source: str = "PLAN_FILE",
    compiled: bool = False,
    lora_config: Optional[str] = None,
    sequence_parallel: bool = False,
) -> None:
    """Refuse a compiled plan (one with a ``model_fingerprint``) made for another model or other settings.

    A hand-written plan without a fingerprint is taken as it is.
    """
    if not plan.model_fingerprint:
        return
    settings = CompileSettings(
        model="",
        plan_ngpus=plan.plan_ngpus,
        mem_per_gpu=1.0,
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accu=grad_accu,
        precision=precision,
        compiled=compiled,
        lora_config=lora_config,
        sequence_parallel=sequence_parallel,
    )
    if model_fingerprint(config, settings) != plan.model_fingerprint:
        raise UserInputError(
            f"{source} was compiled for another model or other settings (model sizes, SEQUENCE_LENGTH, BATCH_SIZE, "
            f"GRADIENT_ACCU_NUM, PRECISION, COMPILE, SEQUENCE_PARALLEL, LoRA): run `bash run.sh compile` again with this run's settings, or remove "
            f"model_fingerprint from the file to use it anyway"
        )


def compile_plan(s: CompileSettings) -> Compiled:
    """Profile, search and pick. Returns the chosen plan (fingerprint filled) or, when nothing fits, an
    error message naming the smallest MEM_PER_GPU (and PLAN_NGPUS, when more GPUs would do) that fits."""
    check_settings(s)
    start = time.perf_counter()
    config = load_config(s.model)
    max_tp = min(s.hardware.gpus_per_node, max(s.plan_ngpus, MAX_SUGGESTED_NGPUS))
    lora = Lora.from_config(s.lora_config, config.model_type) if s.lora_config is not None else None
    spec = spec_of(config)
    profile = _profile(
        config.to_json_string(),
        s.seq_len,
        s.precision,
        tuple(spec.tp_degrees(max_tp)),
        s.attn_implementation,
        s.compiled,
        lora,
    )
    work = Workload(
        batch_size=s.batch_size, seq_len=s.seq_len, grad_accu=s.grad_accu, sequence_parallel=s.sequence_parallel
    )

    def run(plan_ngpus, budget):
        return search(
            profile,
            work,
            s.hardware,
            plan_ngpus,
            s.scaling_factor,
            budget,
            spec,
            s.run_settings(),
            zero=s.zero,
            zero_n_groups=s.zero_n_groups,
            fixed=s.fixed,
        )

    result = run(s.plan_ngpus, s.mem_per_gpu)
    if result.best is not None:
        plan = replace(result.best.plan, model_fingerprint=model_fingerprint(config, s)).validate()
        return Compiled(plan, result, time.perf_counter() - start)
    return Compiled(None, result, time.perf_counter() - start, _no_fit_message(s, result, run))


@functools.lru_cache(maxsize=8)
def _profile(
    config_json: str,
    seq_len: int,
    precision: str,
    tp_degrees: Tuple[int, ...],
    attn_implementation: str,
    compiled: bool = False,
    lora: Optional[Lora] = None,
):
    """The profile, remembered per config text and settings (the search is cheap, profiling is not)."""
    from transformers import AutoConfig

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    return profile_model(
        config, seq_len, precision, tp_degrees, attn_implementation=attn_implementation, compiled=compiled, lora=lora
    )


def _no_fit_message(s: CompileSettings, result: SearchResult, run) -> str:
    """One line when only memory stands in the way (the budget, or the GPUs, that would do); else the few
    closest plans with what stops each, and the one setting to change."""
    if not result.candidates:
        return (
            f"no plan for PLAN_NGPUS={s.plan_ngpus} exists; choose a PLAN_NGPUS whose tensor-parallel degree "
            f"divides the model's heads, kv heads and FFN width"
        )
    smallest = smallest_fit(result)
    if smallest is not None and all(_memory_only(c) for c in result.candidates):
        return _memory_message(s, smallest, run)
    closest = sorted(result.candidates, key=lambda c: (len(c.rejected), c.cost.peak_bytes))[:CLOSEST_SHOWN]
    lines = [
        f"no plan for PLAN_NGPUS={s.plan_ngpus} runs with these settings within MEM_PER_GPU={s.mem_per_gpu:g}; "
        f"the closest:"
    ]
    lines += [f"  {_describe(c)}, {c.cost.peak_gib:.1f} GB: {'; '.join(c.rejected)}" for c in closest]
    one = min(
        (c for c in result.candidates if len(c.rejected) == 1 and not _memory_only(c)),
        key=lambda c: c.cost.step_time,
        default=None,
    )
    if one is not None:
        lines.append(f"change one setting: {one.rejected[0]}")
    if smallest is not None:
        lines.append(("or: " if one is not None else "change one setting: ") + _memory_message(s, smallest, run))
    return "\n".join(lines)


def _memory_only(c) -> bool:
    return bool(c.rejected) and all(r.startswith(OVER_MEMORY) for r in c.rejected)


def _memory_message(s: CompileSettings, smallest, run) -> str:
    need = smallest.cost.peak_gib
    message = (
        f"no plan fits MEM_PER_GPU={s.mem_per_gpu:g}: the smallest needs {need:.1f} GB "
        f"({_describe(smallest)}); raise MEM_PER_GPU to {_round_up(need)} or more"
    )
    more = _more_gpus(s, run)
    return message + (f", or use PLAN_NGPUS={more} (GPUs per scale unit)" if more else ", or add GPUs")


def _more_gpus(s: CompileSettings, run) -> Optional[int]:
    n = s.plan_ngpus * 2
    while n <= MAX_SUGGESTED_NGPUS:
        if run(n, s.mem_per_gpu).best is not None:
            return n
        n *= 2
    return None


def _round_up(gib: float) -> str:
    return f"{int(gib) + 1}"


def _describe(c) -> str:
    p = c.plan
    text = f"tp={p.tp}, pp={p.pp}"
    if p.pp > 1:
        text += f", {p.pp_schedule}, {p.num_microbatches} micro-batches"
    elif p.num_microbatches > 1:
        text += f", {p.num_microbatches} micro-batches"
    return text + (f", recompute {c.recompute}" if c.recompute != "none" else "")


def format_report(compiled: Compiled, top: int = 8) -> str:
    """The chosen plan and the best alternatives as a table, then the plan's JSON."""
    result = compiled.result
    viable = [c for c in result.candidates if not c.rejected]
    rejected = sorted((c for c in result.candidates if c.rejected), key=lambda c: c.cost.step_time)
    rows: List[Tuple[str, object]] = [("chosen" if i == 0 else "ok", c) for i, c in enumerate(viable[:top])]
    rows += [("; ".join(c.rejected), c) for c in rejected[:top]]
    header = (
        f"{'tp':>3} {'pp':>3} {'schedule':<16} {'mb':>4} {'v':>2} {'recompute':<30} {'zero':<5} "
        f"{'memory GB':>9} {'step s':>9}  status"
    )
    lines = [
        f"cube compile: {len(result.candidates)} plans costed in {compiled.seconds:.1f} s, "
        f"MEM_PER_GPU={result.budget_gib:g} GB (GiB, 2**30 bytes)",
        header,
        "-" * len(header),
    ]
    for status, c in rows:
        p = c.plan
        schedule = p.pp_schedule if p.pp > 1 else "-"
        lines.append(
            f"{p.tp:>3} {p.pp:>3} {schedule:<16} {p.num_microbatches:>4} {p.virtual_stages_per_rank:>2} "
            f"{c.recompute:<30} {str(p.zero).lower():<5} {c.cost.peak_gib:>9.2f} {c.cost.step_time:>9.3f}  {status}"
        )
    if compiled.plan is not None:
        best = result.best
        parts = best.cost.parts
        lines.append(
            f"chosen plan: {_describe(best)}; peak memory {best.cost.peak_gib:.2f} GB of which weights, "
            f"gradients and optimizer states {parts['static'] / GIB:.2f} (gradients only from backward on), "
            f"activations kept {parts['activations'] / GIB:.2f}, backward working set "
            f"{parts['transient'] / GIB:.2f}, pipeline buffers {parts['comm'] / GIB:.2f}; "
            f"step {best.cost.step_time:.3f} s = compute+tp {parts['compute_and_tp']:.3f} + bubble "
            f"{parts['bubble']:.3f} + dp {parts['dp']:.3f} + optimizer {parts['optimizer']:.3f}"
        )
        lines.append(compiled.plan.to_json().rstrip())
    return "\n".join(lines)
