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
from ..optim.low_bit import PRECISION_STATES
from . import profile_cache
from .batch_layout import token_budget
from .cost import GIB, Hardware, Workload
from .model_spec import RunSettings, spec_of
from .plan import Plan
from .profile import Lora, load_config, profile_model
from .search import OVER_MEMORY, Fixed, SearchResult, search, smallest_fit, zero_options

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
    max_tokens: Optional[int] = None  # MAX_TOKENS: tokens per micro-batch instead of BATCH_SIZE samples
    seq_len: int = 512  # SEQUENCE_LENGTH
    grad_accu: int = 1  # GRADIENT_ACCU_NUM
    zero: Optional[int] = 0  # USE_ZERO: ZeRO level 0..3; None (auto): the search chooses
    zero_n_groups: Optional[int] = 1  # ZERO_N_GROUPS; None (auto): the search chooses
    precision: str = "fp32"  # PRECISION
    optimizer_states: str = PRECISION_STATES  # OPTIMIZER_STATES: the precision's moments, or 8bit / 4bit
    attn_implementation: str = "sdpa"
    compiled: bool = False  # COMPILE: decoder layers under torch.compile (they keep fewer activations)
    lora_config: Optional[str] = None  # LORA_CONFIG when USE_LORA=1: only the adapters train
    packing: bool = False  # PACK_SEQUENCES
    sequence_parallel: bool = False  # SEQUENCE_PARALLEL
    clip_norm: float = 1.0  # CLIP_NORM (run.sh's default): the step inside the backward needs 0
    fixed: Fixed = field(default_factory=Fixed)
    hardware: Hardware = field(default_factory=Hardware)

    @property
    def batch_rows(self) -> int:
        """The fewest samples a micro-step's batch holds, what the search splits into micro-batches: BATCH_SIZE,
        or the rows of SEQUENCE_LENGTH tokens MAX_TOKENS holds (at least one)."""
        return max(1, self.max_tokens // self.seq_len) if self.max_tokens else self.batch_size

    def run_settings(self) -> RunSettings:
        """What the runtime will run with (a causal LM, the compile pass's head)."""
        return RunSettings(
            precision=self.precision,
            optimizer_states=self.optimizer_states,
            compiled=self.compiled,
            lora=self.lora_config is not None,
            packing=self.packing,
            sequence_parallel=self.sequence_parallel,
            batch_size=0 if self.max_tokens else self.batch_size,
            clip_norm=self.clip_norm,
            grad_accu=self.grad_accu,
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
        if value is None and name == "zero_n_groups":
            continue
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    if s.max_tokens is not None and (not isinstance(s.max_tokens, int) or s.max_tokens < 1):
        raise UserInputError(f"MAX_TOKENS must be a positive integer, got {s.max_tokens!r}")
    if not s.mem_per_gpu > 0:
        raise UserInputError(f"MEM_PER_GPU must be a positive number of GB per GPU, got {s.mem_per_gpu!r}")
    zero_options(s.scaling_factor, s.plan_ngpus, s.hardware.gpus_per_node, s.zero, s.zero_n_groups)


def model_fingerprint(config, s: CompileSettings) -> str:
    """16 hex digits identifying what a plan was compiled for: the model's sizes, SEQUENCE_LENGTH,
    BATCH_SIZE (or MAX_TOKENS), GRADIENT_ACCU_NUM, PRECISION and COMPILE. A saved plan whose fingerprint differs
    is stale."""
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
    if s.max_tokens:  # batches by tokens: BATCH_SIZE does not count
        data.update(batch_size=0, max_tokens=s.max_tokens)
    if s.compiled:  # absent when off, so plans compiled before the setting existed stay current
        data.update(compiled=True)
    if s.sequence_parallel:
        data.update(sequence_parallel=True)
    if s.optimizer_states != PRECISION_STATES:
        data.update(optimizer_states=s.optimizer_states)
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
    max_tokens: Optional[int] = None,
    optimizer_states: str = PRECISION_STATES,
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
        max_tokens=max_tokens or None,
        seq_len=seq_len,
        grad_accu=grad_accu,
        precision=precision,
        compiled=compiled,
        lora_config=lora_config,
        sequence_parallel=sequence_parallel,
        optimizer_states=optimizer_states,
    )
    if model_fingerprint(config, settings) != plan.model_fingerprint:
        raise UserInputError(
            f"{source} was compiled for another model or other settings (model sizes, SEQUENCE_LENGTH, BATCH_SIZE or MAX_TOKENS, "
            f"GRADIENT_ACCU_NUM, PRECISION, OPTIMIZER_STATES, COMPILE, SEQUENCE_PARALLEL, LoRA): run `bash run.sh compile` again with this run's settings, or remove "
            f"model_fingerprint from the file to use it anyway"
        )


def compile_plan(s: CompileSettings) -> Compiled:
    """Profile, search and pick. Returns the chosen plan (fingerprint filled) or, when nothing fits, an
    error message naming the smallest MEM_PER_GPU (and PLAN_NGPUS, when more GPUs would do) that fits."""
    check_settings(s)
    start = time.perf_counter()
    config = load_config(s.model)
    lora = Lora.from_config(s.lora_config, config.model_type) if s.lora_config is not None else None
    spec = spec_of(config)
    work = Workload(
        # MAX_TOKENS: a batch of the token budget (the layout), split into micro-batches of its rows
        batch_size=s.batch_rows,
        seq_len=s.seq_len,
        grad_accu=s.grad_accu,
        sequence_parallel=s.sequence_parallel,
        layout=token_budget(s.max_tokens, s.seq_len) if s.max_tokens else None,
        optimizer_states=s.optimizer_states,
    )

    def run(plan_ngpus, budget):
        # profiled for the tp degrees the run's scale unit can use (profiling costs, the search not); the
        # search for a larger PLAN_NGPUS to suggest profiles every degree inside a node, once
        degrees = spec.tp_degrees(s.hardware.gpus_per_node)
        if plan_ngpus == s.plan_ngpus:
            degrees = [tp for tp in degrees if _may_plan(s, spec, tp)]
            if not degrees or any(tp < plan_ngpus for tp in degrees):
                degrees = sorted({1, *degrees})  # pipeline stages keep the embedding and LM head whole (tp 1)
        profile = _profile(
            config.to_json_string(), s.seq_len, s.precision, tuple(degrees), s.attn_implementation, s.compiled, lora
        )
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


def _may_plan(s: CompileSettings, spec, tp: int) -> bool:
    """Whether the search can make a plan with ``tp`` for the run's scale unit: tp divides PLAN_NGPUS, is the
    user's when fixed, and leaves stages the layers and a batch's micro-batches can fill."""
    pp = s.plan_ngpus // tp
    return (
        s.plan_ngpus % tp == 0
        and (s.fixed.tp or tp) == tp
        and pp <= spec.num_layers
        and (pp == 1 or pp <= s.batch_rows)
    )


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
    """The profile, remembered per config text and settings (the search is cheap, profiling is not): in this
    process, then on disk (``profile_cache``) for later ones."""
    from transformers import AutoConfig

    key = profile_cache.profile_key(config_json, seq_len, precision, tp_degrees, attn_implementation, compiled, lora)
    profile = profile_cache.load(key)
    if profile is None:
        data = json.loads(config_json)
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        profile = profile_model(
            config,
            seq_len,
            precision,
            tp_degrees,
            attn_implementation=attn_implementation,
            compiled=compiled,
            lora=lora,
        )
        profile_cache.store(key, profile)
    return profile


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
    if p.on_fsdp:
        text += f", {_zero_label(p)}"
    if c.recompute.startswith("offload"):
        text += f", {c.recompute} (activations in host memory)"
    elif c.recompute != "none":
        text += f", recompute {c.recompute}"
    return text + (", optimizer step in backward" if p.optimizer_in_backward else "")


def _zero_label(p: Plan) -> str:
    """ZeRO level and hybrid groups as the table shows them: ``ZeRO-3``, ``ZeRO-1x2`` (2 groups)."""
    if not p.zero or not p.on_fsdp:
        return "ZeRO-0"
    return f"ZeRO-{p.zero}" + (f"x{p.zero_n_groups}" if p.zero_n_groups > 1 else "")


def _gradients_held(p: Plan) -> str:
    if p.optimizer_in_backward:
        return "no gradient held: each weight is stepped inside the backward, its gradient freed"
    return "gradients only from backward on"


def _step_label(p: Plan) -> str:
    """Where the optimizer steps, as the table shows it: ``in bwd`` (inside the backward) or ``after``."""
    return "in bwd" if p.optimizer_in_backward else "after"


def zero_alternatives(result: SearchResult) -> List[str]:
    """One line per ZeRO level and grouping the search costed but did not choose: its best plan and why."""
    best = result.best
    lines, seen = [], set()
    for c in result.candidates:  # the viable ones first, fastest first; then the rejected
        key = (c.plan.zero, c.plan.zero_n_groups)
        if key in seen or (best is not None and key == (best.plan.zero, best.plan.zero_n_groups)):
            continue
        seen.add(key)
        if not c.rejected and best is not None:
            why = f"slower: {c.cost.step_time:.3f} s against {best.cost.step_time:.3f} s"
        else:
            fitting = [x for x in result.candidates if (x.plan.zero, x.plan.zero_n_groups) == key]
            c = min(fitting, key=lambda x: (len(x.rejected), x.cost.peak_bytes))
            why = "; ".join(c.rejected)
        lines.append(f"  {_zero_label(c.plan)}: {_describe(c)}, {c.cost.peak_gib:.1f} GB: {why}")
    return lines


def format_report(compiled: Compiled, top: int = 8) -> str:
    """The chosen plan and the best alternatives as a table, then the plan's JSON."""
    result = compiled.result
    viable = [c for c in result.candidates if not c.rejected]
    rejected = sorted((c for c in result.candidates if c.rejected), key=lambda c: c.cost.step_time)
    rows: List[Tuple[str, object]] = [("chosen" if i == 0 else "ok", c) for i, c in enumerate(viable[:top])]
    rows += [("; ".join(c.rejected), c) for c in rejected[:top]]
    header = (
        f"{'tp':>3} {'pp':>3} {'schedule':<16} {'mb':>4} {'v':>2} {'recompute':<30} {'zero':<9} {'step':<8} "
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
            f"{c.recompute:<30} {_zero_label(p):<9} {_step_label(p):<8} {c.cost.peak_gib:>9.2f} "
            f"{c.cost.step_time:>9.3f}  {status}"
        )
    alternatives = zero_alternatives(result)
    if alternatives:
        lines.append("ZeRO levels not chosen (the best plan of each, and why):")
        lines += alternatives
    if compiled.plan is not None:
        best = result.best
        parts = best.cost.parts
        lines.append(
            f"chosen plan: {_describe(best)}; peak memory {best.cost.peak_gib:.2f} GB (tensors {parts['allocated'] / GIB:.2f} "
            f"as torch.cuda.max_memory_allocated counts them, plus allocator slack and workspaces) of which weights, "
            f"gradients and optimizer states {parts['static'] / GIB:.2f} ({_gradients_held(best.plan)}), "
            f"all-gathered weights {parts['unsharded'] / GIB:.2f}, "
            f"activations kept {parts['activations'] / GIB:.2f}, backward working set "
            f"{parts['transient'] / GIB:.2f}, pipeline buffers {parts['comm'] / GIB:.2f}; "
            f"step {best.cost.step_time:.3f} s = compute+tp {parts['compute_and_tp']:.3f} + bubble "
            f"{parts['bubble']:.3f} + dp {parts['dp']:.3f} (of {parts['dp_communication']:.3f} communicated) "
            f"+ optimizer {parts['optimizer']:.3f}"
            + (f", the host's floor {parts['host']:.3f} s" if parts["host"] > parts["device"] else "")
            + (
                f"; offloaded to host memory {parts['offload_bytes'] / GIB:.2f} GB per micro-batch, copied there and "
                f"back in {parts['offload']:.3f} s of compute+tp"
                if parts.get("offload_bytes")
                else ""
            )
        )
        lines.append(compiled.plan.to_json().rstrip())
    return "\n".join(lines)
