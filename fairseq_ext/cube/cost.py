"""Cost model: predicted peak memory per GPU and step time of a Plan, from a ModelProfile.

Memory of one rank (the fullest pipeline stage decides the plan's peak)::

    static      = local parameters x (weight + gradient + optimizer bytes per parameter)
                  optimizer: Adam's two fp32 moments (+ fp32 master weights and gradients when the weights
                  are fp16); from ZeRO level 1 on (FSDP2 ``fully_shard`` across the data-parallel replicas)
                  all of it is divided by the shard count S = CUBE_SCALING_FACTOR / ZERO_N_GROUPS
    unsharded   = FSDP2's all-gathered weights: levels 1 and 2 keep every local weight unsharded from the
                  forward to the end of the backward; level 3 reshards after each layer's forward, so only
                  the layer computing and the one prefetched (plus the root's embedding, norm and head, which
                  FSDP2 keeps) are whole; in the backward each layer's unsharded gradient and its float32
                  reduce-scatter input exist while it runs
    activations = what one micro-batch keeps on the rank's stages x micro-batches in flight:
                  GPipe keeps all m, 1F1B keeps pp - rank (stage 0: pp), Interleaved1F1B keeps
                  (v - 1) x pp + 2 x (pp - 1 - rank) + 1 chunk-forwards (torch.distributed.pipelining's warm-up)
    comm        = pipeline send/receive buffers (one micro-batch's hidden states per chunk, both ways)
    backward    = walked module by module from the last: each frees its activations, adds its gradients
                  (fairseq sets gradients to None, so without accumulation they do not exist in the
                  forward) and holds its backward-only buffers while it runs (the LM head's logits
                  gradient; a recomputed layer's rebuilt activations)
    step        = static (gradients included) + the data-parallel buffer (with PRECISION=fp16 only, which
                  fairseq's DDP runs: its buckets, or the mesh's flat copy of the gradients for tp plans)
    allocated   = max(forward/backward peak, step): what torch.cuda.max_memory_allocated reads (``parts``)
    peak        = allocated x (1 + allocator_slack) + workspace: what MEM_PER_GPU must hold (the caching
                  allocator's fragmentation and cuBLAS workspaces beside the tensors)

Step time of one update::

    per micro-batch and rank: 3 x forward FLOPs (backward = 2 x forward) + recomputed forward FLOPs, at
        device_flops x efficiency (x compiled_speedup for compiled decoder layers), for the tokens the
        micro-batches compute on average (``Workload.layout``: padding included, packed rows without it);
        the attention core's FLOPs grow with the span a token attends over and run at the speed of the
        layout's kernel (``attention_speed``: variable-length documents, padded rows' masked SDPA), + tensor-parallel
        all-reduces (ring: 2 (n-1)/n bytes / bandwidth + 2 (n-1) x latency, intra-node when tp <=
        gpus_per_node) + pipeline sends
    pipeline:  m x slowest rank x (1 + (pp - 1) / (v x m))     (the bubble; v = virtual stages per rank)
    update:    GRADIENT_ACCU_NUM x pipeline + the exposed data-parallel communication + the optimizer step
               (memory bound: ``optimizer_step_bytes`` / HBM bandwidth, on 1/S of the parameters)
    data parallel (:func:`data_parallel_seconds`), per forward-backward pass of a micro-step (and of each
               micro-batch without pipeline stages): level 0 all-reduces the gradients; levels 1-2
               all-gather the weights once and reduce-scatter the gradients; level 3 all-gathers in the
               forward and again in the backward; hybrid groups all-reduce the shards across groups. A
               ring moves (n-1)/n of the data per all-gather or reduce-scatter, twice that per all-reduce,
               over NVLink while the group lies in one node, else over the network. FSDP2 prefetches the
               next layer's collective while one computes: what exceeds the compute it hides behind shows,
               and one layer's worth per pass always does (the first all-gather, the last reduce-scatter).
               One GPU alone at a ZeRO level (FSDP2 over one rank, ``Plan.on_fsdp``): nothing is sharded (S = 1),
               levels 1-2 hold the gathered weights beside the shards, and the collectives are copies in
               memory (:func:`one_rank_copy_seconds`).

Tensor-parallel and pipeline communication is not overlapped (it adds to compute). Cost parameters per GPU
kind: ``hardware.GPU_KINDS`` (fitted on the committed one-GPU runs, benchmarks/results/single_gpu_speed).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from .batch_layout import MASKED, VARLEN, BatchLayout, full_rows
from .hardware import GIB, Hardware
from .model_spec import stage_layers
from .plan import INTERLEAVED, Plan
from .profile_types import ModelProfile
from .runtime.float8 import float8_flops_per_token, kept_bytes_saved_per_token
from .runtime.precision import FLOAT8, stored_as


@dataclass(frozen=True)
class Workload:
    """The run's settings that the cost depends on (run.sh's variables)."""

    batch_size: int  # BATCH_SIZE: samples per scale unit per micro-step
    seq_len: int  # SEQUENCE_LENGTH
    grad_accu: int = 1  # GRADIENT_ACCU_NUM
    sequence_parallel: bool = False  # SEQUENCE_PARALLEL: norms keep their activations for 1/tp of the tokens
    # what a micro-batch computes when rows are not full (packed, padded, MAX_TOKENS); None: full rows of
    # batch_size x seq_len tokens
    layout: Optional[BatchLayout] = None

    def batch_layout(self) -> BatchLayout:
        """The layout the cost is computed for: ``layout``, else full rows."""
        return self.layout or full_rows(self.batch_size, self.seq_len)


# bytes per parameter: (weight, gradient, optimizer-held bytes that ZeRO-1 shards: master copies and Adam's moments)
_PRECISION_BYTES = {
    "fp32": (4, 4, 8),  # two fp32 moments
    "bf16": (4, 4, 8),  # the runtime's bf16 is autocast over fp32 weights
    "bf16-master": (2, 2, 12),  # bf16 weights and gradients; fp32 master weights and moments (torch_adamw)
    "bf16-lean": (2, 2, 4),  # bf16 weights, gradients and moments (torch_adamw, stochastic rounding)
    "fp16": (2, 2, 16),  # fairseq's --fp16: fp32 master weights and gradients, fp32 moments
}
ADAM_STATE_BYTES = 8  # two fp32 moments
# bytes per gradient element FSDP2 reduces: float32 where the precision keeps float32 masters or weights
_REDUCE_BYTES = {"fp32": 4, "bf16": 4, "bf16-master": 4, "bf16-lean": 2, "fp16": 4}
FSDP_LAYERS_IN_FLIGHT = 2  # level 3: the layer computing and the one FSDP2 prefetches


def optimizer_step_bytes(precision: str) -> float:
    """Bytes the optimizer step reads and writes per parameter (before ZeRO-1 sharding).

    torch_adamw's fused kernel reads weight, gradient and two moments and writes weight and moments (7
    tensors); bf16-master's one-launch Triton kernel reads the bf16 gradient and float32 master and moments
    and writes those and the bf16 weight (2 + 12 + 12 + 2; measured 4.1 TB/s on an H200,
    benchmarks/results/optimizer_step); bf16-lean's one-launch kernel reads the bf16 gradient, moments and
    weight and writes moments and weight (2 + 3 * 2 + 3 * 2; the rounding's noise is made in registers;
    3.0 TB/s on an H100 over an 8B model's weights); its unfused path, off GPUs or without Triton, moves
    about 168;
    fairseq's fp16 optimizer adds its float32 gradient copy to the fused step.
    """
    precision = stored_as(precision)
    if precision == "bf16-lean":
        return 2 + 3 * 2 + 3 * 2
    if precision == "bf16-master":
        return 2 + 3 * 4 + 3 * 4 + 2
    weight_b, grad_b, optimizer_b = _PRECISION_BYTES[precision]
    return 3 * weight_b + grad_b + 2 * optimizer_b


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one plan: peak memory of its fullest rank, step time, and their parts (bytes, s)."""

    peak_bytes: float
    step_time: float
    parts: Dict[str, float]

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def in_flight(plan: Plan, rank: int) -> int:
    """Micro-batch chunk-forwards whose activations a pipeline rank holds at its peak."""
    m, pp, v = plan.num_microbatches, plan.pp, plan.virtual_stages_per_rank
    if pp == 1:
        return 1
    if plan.pp_schedule == "GPipe":
        return m
    if plan.pp_schedule == INTERLEAVED:
        return min(m * v, (v - 1) * pp + 2 * (pp - 1 - rank) + 1)
    return min(m, pp - rank)


class _Backward(NamedTuple):
    """One module's backward in the walk of :func:`estimate`: it frees ``kept_bytes``, makes ``grad_bytes``."""

    kept_bytes: float  # activations kept for its backward
    grad_bytes: float  # gradients of its trained parameters
    backward_only: float  # the rise in memory while its backward runs


def estimate(
    profile: ModelProfile, plan: Plan, work: Workload, hw: Hardware, recompute: Optional[Sequence[Optional[str]]] = None
) -> Cost:
    """Predict ``plan``'s peak memory per GPU and step time.

    Args:
        recompute: per decoder layer, the class recomputed in it (or None); default: every layer
            recomputes ``plan.recompute_modules`` (the first one the layer has).
    """
    tp, pp, v = plan.tp, plan.pp, plan.virtual_stages_per_rank
    if recompute is None:
        recompute = [_recomputed_class(profile, plan.recompute_modules)] * profile.num_layers
    layout = work.batch_layout()
    # memory holds the largest micro-batch; time runs the mean one
    if work.layout is None:
        mb_tokens = work.batch_size // plan.num_microbatches * work.seq_len
    else:
        mb_tokens = layout.peak_tokens / plan.num_microbatches
    tokens = layout.tokens / plan.num_microbatches if work.layout is not None else mb_tokens
    layer = profile.module(tp, "layers")
    attention = _attention_seconds_factor(profile, layout, hw)
    # Under pipeline parallel the runtime keeps the embeddings and the LM head whole (no vocab parallel).
    edge_tp = tp if pp == 1 else 1
    embed, norm, head = (profile.module(edge_tp, name) for name in ("embed", "norm", "head"))
    # Without pipeline and vocab parallel the causal-LM loss is the fused chunked one (no full logits).
    head_acts = (profile.fused_head.get(edge_tp) if pp == 1 else None) or head.activations
    shared = profile.shared[tp]
    stages = stage_layers(profile.num_layers, plan.num_stages, plan.stage_boundaries)
    weight_b, grad_b, optimizer_b = _PRECISION_BYTES[stored_as(profile.precision)]
    level = zero_level(plan)
    shards = zero_shards(plan)
    # Level 1 adds up accumulated batches in whole local gradients, reduced once per update
    grad_shards = 1 if level == 1 and work.grad_accu > 1 else shards
    reduce_b = _REDUCE_BYTES[stored_as(profile.precision)]
    rate = (hw.fp32_flops if profile.precision == "fp32" else hw.device_flops) * hw.efficiency
    layer_rate = rate * (hw.compiled_speedup if profile.compiled else 1.0)  # COMPILE compiles the decoder layers
    layer_rate /= float8_time_share(profile, hw)
    tp_link = _link(hw, tp <= hw.gpus_per_node)
    kept_saving = sequence_parallel_saving(profile, tp) if work.sequence_parallel else 0.0
    if profile.precision in FLOAT8 and profile.compiled and layer.trainable is None:
        kept_saving += kept_bytes_saved_per_token(profile.hidden_size, profile.intermediate_size)

    # Gradients live through the forward when they accumulate: over micro-steps, or over micro-batches.
    grads_persist = work.grad_accu > 1 or plan.num_microbatches > 1
    worst, ranks = None, []
    for rank in range(pp):
        rank_stages = [s for s in range(plan.num_stages) if s % pp == rank]
        walk: List[_Backward] = []  # per module of one micro-batch, in forward order
        weights, seconds = 0, 0.0  # weights: all parameter elements of the rank; numel below: the trained ones
        edge_weights, layer_count = 0, 0  # the root's (embedding, norm, head) elements; decoder layers
        # FSDP2 (level >= 1): a layer's gradient is reduce-scattered as its backward ends, leaving 1/S; while it
        # runs, the unsharded gradient and the reduce-scatter's input exist
        layer_grads = layer.local_trainable(tp)
        # Level 0 runs on FSDP2 too (replicas of one shard each), except fp16, which fairseq's DDP runs
        on_fsdp = plan.on_fsdp and (level or profile.precision != "fp16")
        fsdp_backward = layer_grads * (grad_b + reduce_b) if on_fsdp else 0.0
        for s in rank_stages:
            if s == 0:
                walk.append(
                    _Backward(
                        embed.activations.bytes(mb_tokens), embed.local_trainable(edge_tp) * grad_b / grad_shards, 0.0
                    )
                )
                weights += embed.local_numel(edge_tp)
                edge_weights += embed.local_numel(edge_tp)
                seconds += _flops(embed) * tokens / rate + _tp_seconds(embed, edge_tp, tokens, tp_link)
            walk.append(_Backward(shared.bytes(mb_tokens), 0.0, 0.0))
            for i in stages[s]:
                cls = recompute[i]
                acts = layer.activations if cls is None else layer.recompute[cls][0]
                kept = acts.bytes(mb_tokens) - (kept_saving * mb_tokens if cls is None else 0.0)
                walk.append(
                    _Backward(
                        kept,
                        layer_grads * grad_b / grad_shards,
                        acts.backward_bytes(mb_tokens) + fsdp_backward,
                    )
                )
                weights += layer.local_numel(tp)
                layer_count += 1
                extra = 0.0 if cls is None else layer.recompute[cls][1]
                # the attention core's forward and backward, and its forward again when recomputed
                core = layer.attention_flops_per_token * (3 + (cls in (profile.layer_class, profile.attention_class)))
                seconds += (_flops(layer) + extra + core * (attention - 1)) * tokens / layer_rate
                seconds += _tp_seconds(layer, tp, tokens, tp_link, again=cls is not None)
            if s == plan.num_stages - 1:
                walk.append(
                    _Backward(
                        norm.activations.bytes(mb_tokens), norm.local_trainable(edge_tp) * grad_b / grad_shards, 0.0
                    )
                )
                head_grads = head.local_trainable(edge_tp)
                walk.append(
                    _Backward(
                        head_acts.bytes(mb_tokens),
                        head_grads * grad_b / grad_shards,
                        head_acts.backward_bytes(mb_tokens) + (head_grads * (grad_b + reduce_b) if on_fsdp else 0.0),
                    )
                )
                weights += norm.local_numel(edge_tp) + head.local_numel(edge_tp)
                edge_weights += norm.local_numel(edge_tp) + head.local_numel(edge_tp)
                seconds += (_flops(norm) + _flops(head)) * tokens / rate
                seconds += _tp_seconds(head, edge_tp, tokens, tp_link)
        numel = round(sum(w.grad_bytes for w in walk) * grad_shards / grad_b)  # the trained elements before sharding
        kept = sum(w.kept_bytes for w in walk)
        activations = kept / len(rank_stages) * in_flight(plan, rank) if pp > 1 else kept
        p2p_bytes = mb_tokens * profile.hidden_size * 4  # fp32 hidden states between stages
        comm = 4 * p2p_bytes * len(rank_stages) if pp > 1 else 0.0  # send + receive, forward + backward
        if pp > 1:
            p2p_time_bytes = tokens * profile.hidden_size * 4
            seconds += 2 * len(rank_stages) * _p2p_seconds(hw, p2p_time_bytes, plan.plan_ngpus <= hw.gpus_per_node)
        # frozen weights (LoRA's base) hold their weight bytes only; from ZeRO level 1 on, 1/S of everything
        states = (
            numel * (weight_b + optimizer_b) + (weights - numel) * weight_b
        ) / shards + numel * grad_b / grad_shards
        static = states - (0.0 if grads_persist else numel * grad_b / grad_shards)
        unsharded = _unsharded_weights(level, weights, edge_weights, layer.local_numel(tp), layer_count) * weight_b
        grads = numel * grad_b
        dp_buffer = 0.0
        if plan.scaling_factor > 1 and not on_fsdp:
            # fairseq's DDP (PLAN_NGPUS=1) keeps its buckets, a copy of every gradient, from its start to the
            # end (no --gradient-as-bucket-view); the mesh's dp average (PLAN_NGPUS > 1) holds one while it runs
            dp_buffer = grads
        ddp_buckets = dp_buffer if plan.plan_ngpus == 1 else 0.0
        # Backward of the last micro-batch in flight, module by module from the end: its activations are
        # freed as its gradients appear; a module's backward-only buffers exist while it runs.
        current = static + unsharded + activations + comm + ddp_buckets
        fwd_bwd, transient = current, 0.0
        for kept_bytes, grad_bytes, backward_only in reversed(walk):
            if current + backward_only > fwd_bwd:
                fwd_bwd, transient = current + backward_only, backward_only
            current += grad_bytes - kept_bytes - (grad_bytes if grads_persist else 0.0)
        fwd_bwd = max(fwd_bwd, current)
        # torch_adamw's steps hold nothing beside the states: bf16 weights' Triton kernels read the bf16
        # gradients as they are and keep float32 values in registers; FSDP2 has resharded the weights
        step_peak = states + dp_buffer
        allocated = max(fwd_bwd, step_peak)  # what torch.cuda.max_memory_allocated would read
        peak = allocated * (1 + hw.allocator_slack) + hw.workspace_bytes
        ranks.append(
            dict(
                rank=rank,
                numel=numel,
                weights=weights,
                layers=layer_count,
                static=states,
                unsharded=unsharded,
                activations=activations,
                transient=transient,
                comm=comm,
                dp_buffer=dp_buffer,
                allocated=allocated,
                peak=peak,
                seconds_per_microbatch=seconds,
            )
        )
        if worst is None or peak > worst["peak"]:
            worst = ranks[-1]

    m = plan.num_microbatches
    slowest = max(r["seconds_per_microbatch"] for r in ranks)
    pipeline = m * slowest * (1 + (pp - 1) / (v * m))
    bubble = pipeline - m * slowest
    numel = max(r["numel"] for r in ranks)
    busiest = max(ranks, key=lambda r: r["weights"])
    compute = work.grad_accu * m * slowest
    passes = work.grad_accu * (m if pp == 1 else 1)  # forward-backward passes of an update, per stage
    dp_total, dp_seconds = data_parallel_seconds(
        plan,
        hw,
        # FSDP2 reduces in the reduce dtype at every level (level 0: its replicas all-reduce); fairseq's DDP in grad_b
        DataParallelBytes(busiest["weights"] * weight_b, numel * (reduce_b if on_fsdp else grad_b)),
        passes,
        compute,
        max(1, busiest["layers"]),
        grad_reductions=1 if level == 1 else passes,
    )
    if on_fsdp and plan.scaling_factor == 1:  # one GPU alone on FSDP2: its collectives are copies in memory
        dp_total = dp_seconds = one_rank_copy_seconds(
            plan, hw, busiest["weights"] * weight_b, numel, grad_b, reduce_b, passes, 1 if level == 1 else passes
        )
    optimizer_seconds = numel * optimizer_step_bytes(profile.precision) / shards / hw.hbm_bandwidth
    step = work.grad_accu * pipeline + dp_seconds + optimizer_seconds
    parts = dict(
        static=worst["static"],
        unsharded=worst["unsharded"],
        activations=worst["activations"],
        transient=worst["transient"],
        comm=worst["comm"],
        dp_buffer=worst["dp_buffer"],
        allocated=worst["allocated"],
        worst_rank=worst["rank"],
        compute_and_tp=compute,
        bubble=work.grad_accu * bubble,
        dp=dp_seconds,
        dp_communication=dp_total,
        optimizer=optimizer_seconds,
    )
    return Cost(peak_bytes=worst["peak"], step_time=step, parts=parts)


def zero_level(plan: Plan) -> int:
    """The ZeRO level that acts: 0 without FSDP2 (a single scale unit of several GPUs: nothing to shard across;
    one GPU alone at a level >= 1 runs FSDP2 over one rank, ``Plan.on_fsdp``)."""
    return plan.zero if plan.on_fsdp else 0


def zero_shards(plan: Plan) -> int:
    """S: the replicas each sharded state is split across (CUBE_SCALING_FACTOR / ZERO_N_GROUPS), 1 at level 0."""
    return plan.scaling_factor // plan.zero_n_groups if zero_level(plan) else 1


def _unsharded_weights(level: int, weights: int, edge_weights: int, layer_weights: int, layers: int) -> float:
    """Parameter elements FSDP2 holds all-gathered at the forward/backward peak, beside the shards."""
    if level == 0:
        return 0.0
    if level < 3:
        return weights  # kept from the forward to the end of the backward
    return edge_weights + min(layers, FSDP_LAYERS_IN_FLIGHT) * layer_weights


def one_rank_copy_seconds(
    plan: Plan,
    hw: Hardware,
    weight_bytes: float,
    numel: int,
    grad_b: int,
    reduce_b: int,
    passes: int,
    reductions: int,
) -> float:
    """Seconds FSDP2 spends on one rank alone (one GPU at a ZeRO level): each gather copies the shards into
    the gathered weights (read and write), each reduction casts the gradients into the reduce-scatter input
    (read ``grad_b``, write ``reduce_b``), copies it to the output (read and write ``reduce_b``) and, where the
    reduce dtype differs, casts that to the sharded gradient (read ``reduce_b``, write ``grad_b``); memory bound,
    at ``hw.hbm_bandwidth``, not hidden (they compete with the compute for memory)."""
    gathers = passes * (2 if plan.zero == 3 else 1)
    per_grad = grad_b + 3 * reduce_b + (reduce_b + grad_b if reduce_b != grad_b else 0)
    return (gathers * 2 * weight_bytes + reductions * numel * per_grad) / hw.hbm_bandwidth


class DataParallelBytes(NamedTuple):
    """What one rank's data-parallel collectives move: its weights (all-gathers) and gradients (reductions)."""

    weights: float
    grads: float


def data_parallel_seconds(
    plan: Plan,
    hw: Hardware,
    volume: DataParallelBytes,
    passes: int,
    compute: float,
    layers: int,
    grad_reductions: Optional[int] = None,
) -> Tuple[float, float]:
    """(all, exposed) seconds of one update's data-parallel communication (see the module docstring).

    Args:
        passes: forward-backward passes of the update (each all-gathers and reduces once; level 0's
            replicas reduce once per update).
        compute: the update's compute seconds the collectives can hide behind.
        layers: FSDP2 units per pass (decoder layers of the rank): one unit's collective never hides.
        grad_reductions: passes whose gradients are reduced (default: every pass; level 1 reduces once).
    """
    level, n = zero_level(plan), plan.scaling_factor
    if n <= 1:
        return 0.0, 0.0
    if level == 0:
        total = _allreduce_seconds(volume.grads, n, _link(hw, plan.world_size <= hw.gpus_per_node))
        backward = compute / passes * 2 / 3  # the last pass's backward: DDP reduces its buckets as they fill
        return total, max(0.0, total - backward) + total / layers
    shards, groups = zero_shards(plan), plan.zero_n_groups
    link = _link(hw, shards * plan.plan_ngpus <= hw.gpus_per_node)
    gathers = 2 if level == 3 else 1
    reductions = passes if grad_reductions is None else grad_reductions
    reduce = _allgather_seconds(volume.grads, shards, link)  # a reduce-scatter moves what an all-gather does
    if groups > 1:
        reduce += _allreduce_seconds(volume.grads / shards, groups, _link(hw, plan.world_size <= hw.gpus_per_node))
    total = passes * gathers * _allgather_seconds(volume.weights, shards, link) + reductions * reduce
    return total, max(0.0, total - compute) + total / (passes * layers)


def _attention_seconds_factor(profile: ModelProfile, layout: BatchLayout, hw: Hardware) -> float:
    """The attention core's time per token against a full row's under causal SDPA (what the profile counts and
    ``efficiency`` was fitted on): its FLOPs scale with the span a token attends over, at its kernel's speed."""
    speed = {VARLEN: hw.varlen_attention_speed, MASKED: hw.masked_attention_speed}.get(layout.kernel, 1.0)
    return layout.attention_scale(profile.seq_len) / speed


def _flops(module) -> float:
    """Forward plus backward FLOPs per token of ``module``."""
    return module.fwd_flops_per_token + module.backward_flops_per_token


def sequence_parallel_saving(profile: ModelProfile, tp: int) -> float:
    """Bytes per token a decoder layer keeps less under sequence parallel: its two norms keep what they save for
    backward for 1/tp of the tokens. A norm saves its input cast to float32 and its normalised output in the
    weights' dtype (compiled: Inductor's partitioner recomputes the cast, the output stays), per hidden unit."""
    if tp <= 1:
        return 0.0
    weight_bytes = _PRECISION_BYTES[stored_as(profile.precision)][0]
    per_norm = profile.hidden_size * (weight_bytes if profile.compiled else 4 + weight_bytes)
    return 2 * per_norm * (1 - 1 / tp)


def float8_time_share(profile: ModelProfile, hw: Hardware) -> float:
    """A decoder layer's time under ``profile.precision`` against bf16 at the same rate: 1 but for fp8 /
    fp8-lean, whose converted linear layers' share of the layer's FLOPs (``runtime/float8.py``, Llama-style
    shapes) runs ``hw.fp8_speedup`` times faster."""
    if profile.precision not in FLOAT8:
        return 1.0
    layer = profile.module(profile.tp_degrees[0], "layers")
    converted = float8_flops_per_token(
        profile.hidden_size, profile.num_heads, profile.num_kv_heads, profile.intermediate_size
    )
    share = min(1.0, converted / layer.fwd_flops_per_token) if layer.fwd_flops_per_token else 0.0
    return 1.0 - share + share / hw.fp8_speedup


def stage_seconds_per_layer(profile: ModelProfile, tp: int, recompute_cls: Optional[str]) -> float:
    """Relative cost of one decoder layer (forward + backward + recompute FLOPs per token), for balancing."""
    layer = profile.module(tp, "layers")
    extra = 0.0 if recompute_cls is None else layer.recompute[recompute_cls][1]
    return _flops(layer) + extra


def _recomputed_class(profile: ModelProfile, names: Sequence[str]) -> Optional[str]:
    layer = profile.module(profile.tp_degrees[0], "layers")
    for name in names:
        if name in layer.recompute:
            return name
    return None


def _link(hw: Hardware, intra: bool) -> Tuple[float, float]:
    return (
        (hw.intra_node_bandwidth, hw.intra_node_latency) if intra else (hw.inter_node_bandwidth, hw.inter_node_latency)
    )


def _allreduce_seconds(nbytes: float, n: int, link: Tuple[float, float]) -> float:
    """Ring all-reduce: each rank sends and receives 2 (n-1)/n of the data in 2 (n-1) steps."""
    if n <= 1:
        return 0.0
    bandwidth, latency = link
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def _allgather_seconds(nbytes: float, n: int, link: Tuple[float, float]) -> float:
    """Ring all-gather (or reduce-scatter) of ``nbytes`` in all: each rank moves (n-1)/n of it in n-1 steps."""
    if n <= 1:
        return 0.0
    bandwidth, latency = link
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency


def _p2p_seconds(hw: Hardware, nbytes: float, intra: bool) -> float:
    bandwidth, latency = _link(hw, intra)
    return nbytes / bandwidth + latency


def _tp_seconds(module, tp: int, tokens: int, link, again: bool = False) -> float:
    """Tensor-parallel all-reduces of one micro-batch through ``module``: forward, backward, and the
    forward's again when the module is recomputed."""
    if tp <= 1:
        return 0.0
    (fwd_bytes, bwd_bytes), (fwd_count, bwd_count) = module.tp_allreduce_per_token, module.tp_allreduce_count
    total = 0.0
    for per_token, count in ((fwd_bytes, fwd_count), (bwd_bytes, bwd_count)) + (
        ((fwd_bytes, fwd_count),) if again else ()
    ):
        if count:
            total += count * _allreduce_seconds(per_token / count * tokens, tp, link)
    return total


def predicted_vs_measured(rows: Sequence[dict]) -> str:
    """The calibration table: each row holds a plan's ``name``, ``predicted_gib``, ``measured_gib``
    (``torch.cuda.max_memory_allocated`` / 2**30) and optionally ``predicted_s`` and ``measured_s`` (seconds
    per update) and ``group`` (the settings a search holds fixed: plans of one group are alternatives).
    Returns the table as text, with the memory error per row and whether the predicted step times rank the
    plans of each group as the measured ones do. Issue 5 asks for memory within 5%."""
    lines = [f"{'plan':<44} {'pred GiB':>9} {'meas GiB':>9} {'error':>7} {'pred s':>8} {'meas s':>8} {'error':>7}"]
    for row in rows:
        error = (row["predicted_gib"] - row["measured_gib"]) / row["measured_gib"]
        time_error = _time_error(row)
        lines.append(
            f"{row['name']:<44} {row['predicted_gib']:9.2f} {row['measured_gib']:9.2f} {error:+7.1%} "
            f"{row.get('predicted_s', math.nan):8.3f} {row.get('measured_s', math.nan):8.3f} "
            f"{time_error if time_error is not None else math.nan:+7.1%}"
        )
    groups = {}
    for row in rows:
        if "predicted_s" in row and "measured_s" in row:
            groups.setdefault(row.get("group", ""), []).append(row)
    for group, timed in sorted(groups.items()):
        if len(timed) > 1:
            same = sorted(timed, key=lambda r: r["predicted_s"]) == sorted(timed, key=lambda r: r["measured_s"])
            lines.append(
                f"step-time ranking {'matches' if same else 'DIFFERS from'} the measured one"
                + (f" among {len(timed)} plans of {group}" if group else "")
            )
    worst = max(abs(r["predicted_gib"] - r["measured_gib"]) / r["measured_gib"] for r in rows) if rows else 0.0
    lines.append(f"largest memory error {worst:.1%} ({'within' if worst <= 0.05 else 'outside'} 5%)")
    time_errors = [abs(e) for e in map(_time_error, rows) if e is not None]
    if time_errors:
        lines.append(f"largest step-time error {max(time_errors):.1%}")
    return "\n".join(lines)


def _time_error(row: dict) -> Optional[float]:
    if "predicted_s" not in row or "measured_s" not in row:
        return None
    return (row["predicted_s"] - row["measured_s"]) / row["measured_s"]
