"""Plan search: enumerate the plans of a scale unit, predict each one's cost, keep those under MEM_PER_GPU,
pick the fastest, and say why every other one lost.

Enumerated: tp (dividing heads, kv heads and FFN width, at most the GPUs of a node), pp = PLAN_NGPUS / tp
(at most the layers), schedule (GPipe, 1F1B, Interleaved1F1B with 2.. virtual stages per rank), micro-batch
count (divisors of BATCH_SIZE, at least pp; without pipeline the batch's parts accumulate inside the step, so
a BATCH_SIZE too big for memory is split rather than refused), recompute (none, or the decoder layer / attention / MLP class;
the user's RECOMPUTE_MODULE_NAMES only, when set), and stage boundaries balanced by cost (the contiguous
partition of the layers that minimises the slowest stage), and the ZeRO level and hybrid groups (the user's
USE_ZERO / ZERO_N_GROUPS when set; else levels 0, 1 and 3 (2 costs what 1 does), sharded across all scale
units or inside groups that fit a node). A per-layer
recompute (the fewest layers of each stage) is shown where it would fit, but Plan v1 names classes, not
layers, so it is never emitted.

The optimizer step inside the backward (``Plan.optimizer_in_backward``, ``optim/in_backward.py``) is costed for
a plan that does not fit MEM_PER_GPU without it, where the run's settings allow it (one process, no clipping, no
accumulation: ``model_spec.optimizer_in_backward_reasons``), or for every plan when the user set
OPTIMIZER_IN_BACKWARD. Only where needed, though the cost model gives it the same step time and less memory:
it changes what a run does beyond memory (a kernel launch per weight instead of one for all, an update partly
applied when a gradient is not finite, other stochastic rounding under bf16-lean), so a plan that fits without
it keeps today's step; where it lets a larger micro-batch fit, that plan ranks first (fewer micro-batches).

Activation offloading (the decoder layers' saved tensors in pinned host memory, ``runtime/offload.py``) is
costed beside every plan without recompute that does not fit MEM_PER_GPU, and competes with recompute on
predicted step time (it trades the copies' seconds over the host link for recompute's FLOPs); with
OFFLOAD_ACTIVATIONS=1 every plan without recompute offloads, and recompute is not tried.

Plans the runtime refuses with the run's settings (the model spec's ``unsupported``: e.g. COMPILE=1 or
fairseq's --fp16 with PLAN_NGPUS > 1, LoRA with pipeline parallel) are costed and listed with the spec's
reason, never chosen.
"""

from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple

from ..errors import UserInputError
from .cost import Cost, Hardware, Workload, estimate, stage_seconds_per_layer
from .model_spec import (
    ModelSpec,
    RunSettings,
    optimizer_in_backward_reasons,
    optimizer_states_reasons,
    stage_layers,
)
from .plan import INTERLEAVED, MAX_ZERO, Plan
from .profile_types import ModelProfile

MAX_VIRTUAL_STAGES = 4
PER_LAYER = "per-layer"
NOT_IN_PLAN = "per-layer recompute: Plan v1 names classes, not layers"
OVER_MEMORY = "over MEM_PER_GPU"
# Without accumulation level 2 runs as 1 does (each pass's gradients reduce-scattered), so costs the same; with
# it, level 1 keeps whole gradients and reduces once, level 2 keeps shards and reduces every pass.
AUTO_ZERO_LEVELS = (0, 1, 3)
AUTO_ZERO_LEVELS_ACCUMULATING = (0, 1, 2, 3)


@dataclass(frozen=True)
class Candidate:
    """One costed plan. ``rejected`` is empty for a plan that may be chosen, else the reasons."""

    plan: Plan
    cost: Cost
    recompute: str  # what the table prints: "none", class names, or "LlamaDecoderLayer 5/8 per stage"
    rejected: Tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchResult:
    best: Optional[Candidate]
    candidates: List[Candidate]  # chosen first, then the other viable ones by step time, then the rejected
    budget_gib: float


@dataclass(frozen=True)
class Fixed:
    """What the user fixed; None: the search chooses."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    pp_schedule: Optional[str] = None
    num_microbatches: Optional[int] = None
    stage_boundaries: Optional[Tuple[int, ...]] = None
    recompute_modules: Optional[Tuple[str, ...]] = None  # RECOMPUTE_MODULE_NAMES, when set
    optimizer_in_backward: Optional[bool] = None  # OPTIMIZER_IN_BACKWARD, when set
    offload: Optional[bool] = None  # OFFLOAD_ACTIVATIONS: True offloads every plan; None: where it does not fit


def search(
    profile: ModelProfile,
    work: Workload,
    hw: Hardware,
    plan_ngpus: int,
    scaling_factor: int,
    budget_gib: float,
    spec: ModelSpec,
    settings: RunSettings = RunSettings(),
    zero: Optional[int] = 0,
    zero_n_groups: Optional[int] = 1,
    fixed: Fixed = Fixed(),
) -> SearchResult:
    """Cost every plan of a ``plan_ngpus`` scale unit; return them ranked, the fastest one that fits first.

    ``spec`` (the model's, ``model_spec.spec_of``) and the run's ``settings`` say which plans the runtime
    refuses: those are listed with the reasons, never chosen. ``zero`` / ``zero_n_groups`` None: the
    search chooses them (:func:`zero_options`).

    Invariant relied on by callers: the set of plans does not depend on ``budget_gib``, so a larger budget
    never yields a slower best plan.
    """
    candidates = []
    for plan, recompute in _plans(profile, work, hw, plan_ngpus, scaling_factor, zero, zero_n_groups, fixed, spec):
        if fixed.offload and recompute is None:
            plan = replace(plan, offload_modules=(profile.layer_class,))
        cost = estimate(profile, plan, work, hw)
        candidates.append(_judge(plan, cost, _label(recompute, plan), budget_gib, spec, settings))
        in_backward = _in_backward_variant(plan, cost, budget_gib, settings, fixed)
        if in_backward is not None:
            in_backward_cost = estimate(profile, in_backward, work, hw)
            candidates.append(
                _judge(in_backward, in_backward_cost, _label(recompute, in_backward), budget_gib, spec, settings)
            )
        if recompute is None and cost.peak_gib > budget_gib and fixed.offload is None:
            offloaded = _offloaded(profile, plan, work, hw, budget_gib, spec, settings)
            if offloaded is not None:
                candidates.append(offloaded)
        if (
            recompute is None
            and cost.peak_gib > budget_gib
            and profile.layer_class in _recompute_options(profile, fixed)
        ):
            per_layer = _per_layer(profile, plan, work, hw, budget_gib)
            if per_layer is not None:
                candidates.append(_judge(*per_layer, budget_gib, spec, settings, extra=(NOT_IN_PLAN,)))
    viable = sorted((c for c in candidates if not c.rejected), key=_rank)
    rejected = sorted((c for c in candidates if c.rejected), key=lambda c: (c.cost.peak_bytes, c.cost.step_time))
    return SearchResult(best=viable[0] if viable else None, candidates=viable + rejected, budget_gib=budget_gib)


def zero_options(
    scaling_factor: int,
    plan_ngpus: int,
    gpus_per_node: int,
    zero: Optional[int],
    zero_n_groups: Optional[int],
    accumulating: bool = False,
) -> List[Tuple[int, int]]:
    """(ZeRO level, hybrid groups) pairs to cost: the user's when set; else levels 0, 1 and 3 (and 2 when
    batches accumulate), each sharded across every scale unit and, where that differs, inside groups of the
    replicas that share a node. One scale unit: level 0, or on one GPU the level the user set (FSDP2 over
    one rank, ``Plan.on_fsdp``; never chosen by the search: it only adds copies and memory)."""
    auto = AUTO_ZERO_LEVELS_ACCUMULATING if accumulating else AUTO_ZERO_LEVELS
    levels = [zero] if zero is not None else list(auto)
    if scaling_factor == 1:  # nothing to shard across; one GPU alone runs FSDP2 at the level the user set
        levels, zero_n_groups = ([zero] if zero and plan_ngpus == 1 else [0]), 1
    if zero_n_groups is not None:
        groups = [zero_n_groups]
    else:
        per_node = max(1, gpus_per_node // plan_ngpus)
        hybrid = 1 < per_node < scaling_factor and scaling_factor % per_node == 0
        groups = [1] + ([scaling_factor // per_node] if hybrid else [])
    options = []
    for level in levels:
        if not 0 <= level <= MAX_ZERO:
            raise UserInputError(f"USE_ZERO must be a ZeRO level 0..{MAX_ZERO} or auto, got {level!r}")
        for g in groups if level else [1]:
            if scaling_factor % g:
                raise UserInputError(
                    f"ZERO_N_GROUPS {g} does not divide CUBE_SCALING_FACTOR {scaling_factor}; choose a divisor "
                    f"of {scaling_factor}, or leave ZERO_N_GROUPS unset to let the search choose"
                )
            if (level, g) not in options:
                options.append((level, g))
    return options


def smallest_fit(result: SearchResult) -> Optional[Candidate]:
    """The candidate with the smallest predicted peak among those rejected only for memory."""
    allowed = [c for c in result.candidates if all(r.startswith(OVER_MEMORY) for r in c.rejected)]
    return min(allowed, key=lambda c: (c.cost.peak_bytes, c.cost.step_time), default=None)


def balanced_boundaries(
    profile: ModelProfile, tp: int, num_stages: int, recompute_cls: Optional[str]
) -> Tuple[int, ...]:
    """First layer of stages 1..S-1 for the contiguous partition of the layers that minimises the slowest
    stage; stage 0 also runs the embedding, the last stage the norm and the LM head (with its loss)."""
    n = profile.num_layers
    per_layer = stage_seconds_per_layer(profile, tp, recompute_cls)
    first = 3 * profile.module(tp, "embed").fwd_flops_per_token
    last = 3 * (profile.module(tp, "norm").fwd_flops_per_token + profile.module(tp, "head").fwd_flops_per_token)

    def cost(stage: int, a: int, b: int) -> float:  # layers a..b-1 on ``stage``
        return (b - a) * per_layer + (first if stage == 0 else 0.0) + (last if stage == num_stages - 1 else 0.0)

    # best[s][j]: the slowest stage of the best split of layers 0..j-1 into stages 0..s
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                value = max(best[s - 1][i], cost(s, i, j))
                if value < best[s][j] - 1e-9:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n
    for s in range(num_stages - 1, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    return tuple(reversed(bounds))


def _plans(profile, work, hw, plan_ngpus, scaling_factor, zero, zero_n_groups, fixed, spec):
    """Yield (plan, recompute class or None) for every combination the search considers: tp degrees the
    model splits into, stage counts it has layers for."""
    options = zero_options(scaling_factor, plan_ngpus, hw.gpus_per_node, zero, zero_n_groups, work.grad_accu > 1)
    balanced = {}  # (tp, stages, recompute) -> boundaries: the same for every schedule and micro-batch count
    for tp in profile.tp_degrees:
        if plan_ngpus % tp or tp > hw.gpus_per_node or (fixed.tp and tp != fixed.tp):
            continue
        pp = plan_ngpus // tp
        if pp > profile.num_layers or (fixed.pp and pp != fixed.pp):
            continue
        for schedule, m, v in _schedules(profile, work, pp, fixed):
            for recompute in _recompute_options(profile, fixed):
                names = fixed.recompute_modules if fixed.recompute_modules else ((recompute,) if recompute else ())
                stages = pp * v
                if fixed.stage_boundaries is not None:
                    bounds = fixed.stage_boundaries
                elif stages > 1:
                    key = (tp, stages, recompute)
                    if key not in balanced:
                        balanced[key] = balanced_boundaries(profile, tp, stages, recompute)
                    bounds = balanced[key]
                else:
                    bounds = ()
                for level, groups in options:
                    yield from _valid(
                        Plan(
                            plan_ngpus=plan_ngpus,
                            scaling_factor=scaling_factor,
                            tp=tp,
                            pp=pp,
                            pp_schedule=schedule,
                            num_microbatches=m,
                            virtual_stages_per_rank=v,
                            stage_boundaries=bounds,
                            zero=level,
                            zero_n_groups=groups,
                            recompute_modules=names,
                            optimizer_in_backward=bool(fixed.optimizer_in_backward),
                        ),
                        recompute,
                        spec,
                    )


def _in_backward_variant(plan: Plan, cost: Cost, budget_gib: float, settings: RunSettings, fixed: Fixed):
    """``plan`` with the optimizer step inside the backward, when the search chooses it (OPTIMIZER_IN_BACKWARD
    unset) and it is needed (``plan`` over the budget) and allowed with the run's settings; else None."""
    if fixed.optimizer_in_backward is not None or cost.peak_gib <= budget_gib:
        return None
    variant = replace(plan, optimizer_in_backward=True)
    refused = optimizer_in_backward_reasons(variant, settings) or optimizer_states_reasons(variant, settings)
    return None if refused else variant


def _valid(plan: Plan, recompute: Optional[str], spec: ModelSpec) -> Iterator[Tuple[Plan, Optional[str]]]:
    """``(plan, recompute)`` when the plan is valid on its own and the model can take its tp and stages."""
    try:
        plan.validate()
    except UserInputError:
        return
    if not spec.tp_reasons(plan.tp) and plan.num_stages <= spec.num_layers:
        yield plan, recompute


def _schedules(profile, work, pp, fixed):
    counts = [m for m in range(pp, work.batch_size + 1) if work.batch_size % m == 0]
    if pp == 1:  # no pipeline: BATCH_SIZE in m parts accumulated inside the step; GRADIENT_ACCU_NUM stays the user's
        for m in counts:
            if not fixed.num_microbatches or m == fixed.num_microbatches:
                yield "1F1B", m, 1
        return
    for schedule in ("GPipe", "1F1B", INTERLEAVED):
        if fixed.pp_schedule and schedule != fixed.pp_schedule:
            continue
        for m in counts:
            if fixed.num_microbatches and m != fixed.num_microbatches:
                continue
            if schedule != INTERLEAVED:
                yield schedule, m, 1
                continue
            if m % pp:
                continue  # torch's interleaved schedules want whole rounds of micro-batches
            for v in range(2, MAX_VIRTUAL_STAGES + 1):
                if pp * v <= profile.num_layers:
                    yield schedule, m, v


def _recompute_options(profile, fixed) -> List[Optional[str]]:
    """Recompute classes to try: the user's when set (the model is built with them), else none, the
    decoder layer, its attention and its MLP."""
    known = [profile.layer_class, profile.attention_class, profile.mlp_class]
    if fixed.recompute_modules:
        unknown = [name for name in fixed.recompute_modules if name not in known]
        if unknown:
            raise UserInputError(
                f"RECOMPUTE_MODULE_NAMES {', '.join(unknown)}: the compile pass models recompute "
                f"of {', '.join(known)}; choose among them or leave it empty to let the search choose"
            )
        for name in known:  # the outermost class the user named decides what a layer keeps
            if name in fixed.recompute_modules:
                return [name]
    if fixed.offload:
        return [None]
    return [None] + list(dict.fromkeys(known))


def _per_layer(profile, plan, work, hw, budget_gib):
    """Recompute the whole decoder layer on the fewest layers of each stage (the same count k in every
    stage) that brings the peak under the budget; None when even every layer is not enough."""
    stages = stage_layers(profile.num_layers, plan.num_stages, plan.stage_boundaries)
    longest = max(len(r) for r in stages)
    for k in range(1, longest):
        recompute = [None] * profile.num_layers
        for r in stages:
            for i in list(r)[:k]:
                recompute[i] = profile.layer_class
        cost = estimate(profile, plan, work, hw, recompute=recompute)
        if cost.peak_gib <= budget_gib:
            plan = replace(plan, recompute_modules=(profile.layer_class,))
            return plan, cost, f"{profile.layer_class} {k}/{longest} {PER_LAYER}"
    return None


def _judge(plan, cost, label, budget_gib, spec, settings, extra=()) -> Candidate:
    reasons = []
    if cost.peak_gib > budget_gib:
        reasons.append(f"{OVER_MEMORY} ({cost.peak_gib:.1f} > {budget_gib:g})")
    reasons += spec.unsupported(plan, settings)
    return Candidate(plan=plan, cost=cost, recompute=label, rejected=tuple(reasons) + tuple(extra))


def _offloaded(profile, plan, work, hw, budget_gib, spec, settings) -> Optional[Candidate]:
    """``plan`` with its decoder layers' activations offloaded to host memory, costed and judged; None where the
    runtime refuses offloading with that plan (the spec gives it reasons the plan without has not)."""
    offloading = replace(plan, offload_modules=(profile.layer_class,))
    if len(spec.unsupported(offloading, settings)) > len(spec.unsupported(plan, settings)):
        return None
    cost = estimate(profile, offloading, work, hw)
    return _judge(offloading, cost, _label(None, offloading), budget_gib, spec, settings)


def _label(recompute: Optional[str], plan: Optional[Plan] = None) -> str:
    """The table's recompute column: the recomputed class, ``offload <class>``, or ``none``."""
    if plan is not None and plan.offload_modules:
        return "offload " + ",".join(plan.offload_modules)
    return recompute or "none"


def _rank(c: Candidate):
    # equal predicted times (a batch in parts costs the same FLOPs; the host's floor): the device's time, then fewer
    # micro-batches, which run larger kernels
    return (
        float(f"{c.cost.step_time:.9g}"),
        float(f"{c.cost.parts['device']:.9g}"),
        c.plan.num_microbatches,
        c.plan.optimizer_in_backward,
        c.plan.zero,
        c.cost.peak_bytes,
        len(c.plan.recompute_modules),
        c.plan.pp,
    )
