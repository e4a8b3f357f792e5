"""Cost model: predicted peak memory per GPU and step time of a Plan, from a ModelProfile.

Memory of one rank (the fullest pipeline stage decides the plan's peak)::

    static      = local parameters x (weight + gradient + optimizer bytes per parameter)
                  optimizer: Adam's two fp32 moments (+ fp32 master weights and gradients when the weights
                  are fp16); from ZeRO level 1 on (FSDP2 ``fully_shard`` across the data-parallel replicas)
                  all of it is divided by the shard count S = CUBE_SCALING_FACTOR / ZERO_N_GROUPS
    unsharded   = FSDP2's all-gathered weights: levels 1 and 2 keep every local weight unsharded from the
                  forward to the end of the backward; level 3 reshards after each layer's forward, so only
                  the layer computing and the one prefetched (plus the root's embedding, norm and head, which
                  FSDP2 keeps) are whole; in the backward each layer's unsharded gradient and its
                  reduce-scatter input exist while it runs; the root's gradients are reduced after the whole
                  backward
    activations = what one micro-batch keeps on the rank's stages x micro-batches in flight:
                  GPipe keeps all m, 1F1B keeps pp - rank (stage 0: pp), Interleaved1F1B keeps
                  (v - 1) x pp + 2 x (pp - 1 - rank) + 1 chunk-forwards (torch.distributed.pipelining's warm-up)
    comm        = pipeline send/receive buffers (one micro-batch's hidden states per chunk, both ways)
    offloaded   = a decoder layer of ``plan.offload_modules`` (not recomputed) keeps nothing it saves on the
                  device (``runtime/offload.py``: saved tensors under 1 MiB stay, which the profile does not
                  separate and real sizes make negligible); its backward holds its activations again while it
                  runs (the layer in flight)
    backward    = walked module by module from the last: each frees its activations, adds its gradients
                  (fairseq sets gradients to None, so without accumulation they do not exist in the
                  forward) and holds its backward-only buffers while it runs (the LM head's logits
                  gradient; a recomputed layer's rebuilt activations)
    step        = static (gradients included) + the data-parallel buffer (with PRECISION=fp16 only, which
                  fairseq's DDP runs: its buckets, or the mesh's flat copy of the gradients for tp plans)
    optimizer_in_backward: no gradient is held; each module's exist while its backward runs
                  (:func:`gradients_stepped_in_backward`), and there is no step after the backward
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
        + an offloaded layer's kept bytes copied to pinned host memory and back (2 x bytes / host_bandwidth,
        not hidden: the copies run on the compute stream)
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

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..optim import low_bit
from ..optim.low_bit import PRECISION_STATES
from .batch_layout import VARLEN, BatchLayout, full_rows
from .communication_cost import link, p2p_seconds, tp_seconds
from .data_parallel_cost import (
    DataParallelBytes,
    data_parallel_seconds,
    layers_in_flight,
    one_rank_copy_seconds,
    reduce_bytes,
    unsharded_weights,
    zero_level,
    zero_shards,
)
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
    # padded lengths the update runs for the first time in the run (batch_layout.first_lengths); 0 in the
    # steady state a plan is chosen for (at most SEQUENCE_LENGTH / LENGTH_BUCKET of them over a whole run)
    new_lengths: int = 0
    optimizer_states: str = PRECISION_STATES  # OPTIMIZER_STATES: 8bit / 4bit quantize Adam's moments (low_bit.py)

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


def precision_bytes(precision: str, optimizer_states: str = PRECISION_STATES) -> Tuple[float, float, float]:
    """(weight, gradient, optimizer-held) bytes per trained parameter of ``precision`` with ``optimizer_states``:
    low-bit states (``optim/low_bit.py``) replace the precision's moments and keep no master weights."""
    weight_b, grad_b, optimizer_b = _PRECISION_BYTES[stored_as(precision)]
    if low_bit.is_low_bit(optimizer_states):
        optimizer_b = low_bit.state_bytes(optimizer_states)
    return weight_b, grad_b, optimizer_b


def optimizer_step_bytes(precision: str, optimizer_states: str = PRECISION_STATES) -> float:
    """Bytes the optimizer step reads and writes per parameter (before ZeRO-1 sharding).

    torch_adamw's fused kernel reads weight, gradient and two moments and writes weight and moments (7
    tensors); bf16-master's one-launch Triton kernel reads the bf16 gradient and float32 master and moments
    and writes those and the bf16 weight (2 + 12 + 12 + 2; measured 4.1 TB/s on an H200,
    benchmarks/results/optimizer_step); bf16-lean's one-launch kernel reads the bf16 gradient, moments and
    weight and writes moments and weight (2 + 3 * 2 + 3 * 2; the rounding's noise is made in registers;
    3.0 TB/s on an H100 over an 8B model's weights); its unfused path, off GPUs or without Triton, moves
    about 168;
    fairseq's fp16 optimizer adds its float32 gradient copy to the fused step. Low-bit states: ``low_bit.step_bytes``
    (torchao's step, after a pass scaling the gradients).
    """
    if low_bit.is_low_bit(optimizer_states):
        weight_b, grad_b, _ = precision_bytes(precision, optimizer_states)
        return low_bit.step_bytes(optimizer_states, weight_b, grad_b)
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
    weight_b, grad_b, optimizer_b = precision_bytes(profile.precision, work.optimizer_states)
    level = zero_level(plan)
    shards = zero_shards(plan)
    # Level 1 adds up accumulated batches in whole local gradients, reduced once per update
    grad_shards = 1 if level == 1 and work.grad_accu > 1 else shards
    reduce_b = reduce_bytes(profile.precision, grad_b, plan.scaling_factor)
    rate = (hw.fp32_flops if profile.precision == "fp32" else hw.device_flops) * hw.efficiency
    layer_rate = rate * (hw.compiled_speedup if profile.compiled else 1.0)  # COMPILE compiles the decoder layers
    layer_rate /= float8_time_share(profile, hw)
    tp_link = link(hw, tp <= hw.gpus_per_node)
    kept_saving = sequence_parallel_saving(profile, tp) if work.sequence_parallel else 0.0
    if profile.precision in FLOAT8 and profile.compiled and layer.trainable is None:
        kept_saving += kept_bytes_saved_per_token(profile.hidden_size, profile.intermediate_size)

    offloaded = profile.layer_class in plan.offload_modules
    # Gradients live through the forward when they accumulate: over micro-steps, or over micro-batches.
    grads_persist = work.grad_accu > 1 or plan.num_microbatches > 1
    worst, ranks = None, []
    for rank in range(pp):
        rank_stages = [s for s in range(plan.num_stages) if s % pp == rank]
        walk: List[_Backward] = []  # per module of one micro-batch, in forward order
        weights, seconds = 0, 0.0  # weights: all parameter elements of the rank; numel below: the trained ones
        edge_weights, layer_count = 0, 0  # the root's (embedding, norm, head) elements; decoder layers
        offload_bytes, offload_seconds = 0.0, 0.0  # per micro-batch: copied to the host (and back), their seconds
        # FSDP2 (level >= 1): a layer's gradient is reduce-scattered as its backward ends, leaving 1/S; while it
        # runs, the unsharded gradient and the reduce-scatter's input exist
        layer_grads = layer.local_trainable(tp)
        # Level 0 runs on FSDP2 too (replicas of one shard each), except fp16, which fairseq's DDP runs
        on_fsdp = plan.on_fsdp and (level or profile.precision != "fp16")
        fsdp_backward = layer_grads * (grad_b + reduce_b) if on_fsdp else 0.0
        rank_layers = sum(len(stages[s]) for s in rank_stages)
        gathered_layers = layers_in_flight(level, layer.local_numel(tp), rank_layers) * weight_b
        root_grads = 0  # the root's gradients, reduced once its whole backward has run (after the embeddings')
        for s in rank_stages:
            if s == 0:
                walk.append(
                    _Backward(
                        embed.activations.bytes(mb_tokens), embed.local_trainable(edge_tp) * grad_b / grad_shards, 0.0
                    )
                )
                weights += embed.local_numel(edge_tp)
                edge_weights += embed.local_numel(edge_tp)
                root_grads += embed.local_trainable(edge_tp)
                seconds += _flops(embed) * tokens / rate + tp_seconds(embed, edge_tp, tokens, tp_link)
            walk.append(_Backward(shared.bytes(mb_tokens), 0.0, 0.0))
            for i in stages[s]:
                cls = recompute[i]
                acts = layer.activations if cls is None else layer.recompute[cls][0]
                kept = acts.bytes(mb_tokens) - (kept_saving * mb_tokens if cls is None else 0.0)
                in_flight_bytes = 0.0
                if cls is None and offloaded:
                    in_flight_bytes, kept = kept, 0.0
                    moved = acts.bytes(tokens) - kept_saving * tokens
                    offload_bytes += moved
                    offload_seconds += 2 * moved / hw.host_bandwidth
                walk.append(
                    _Backward(
                        kept,
                        layer_grads * grad_b / grad_shards,
                        acts.backward_bytes(mb_tokens) + fsdp_backward + gathered_layers + in_flight_bytes,
                    )
                )
                weights += layer.local_numel(tp)
                layer_count += 1
                extra = 0.0 if cls is None else layer.recompute[cls][1]
                # the attention core's forward and backward, and its forward again when recomputed
                core = layer.attention_flops_per_token * (3 + (cls in (profile.layer_class, profile.attention_class)))
                seconds += (_flops(layer) + extra + core * (attention - 1)) * tokens / layer_rate
                seconds += tp_seconds(layer, tp, tokens, tp_link, again=cls is not None)
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
                        head_acts.backward_bytes(mb_tokens),
                    )
                )
                weights += norm.local_numel(edge_tp) + head.local_numel(edge_tp)
                edge_weights += norm.local_numel(edge_tp) + head.local_numel(edge_tp)
                root_grads += norm.local_trainable(edge_tp) + head_grads
                seconds += (_flops(norm) + _flops(head)) * tokens / rate
                seconds += tp_seconds(head, edge_tp, tokens, tp_link)
        seconds += offload_seconds
        numel = round(sum(w.grad_bytes for w in walk) * grad_shards / grad_b)  # the trained elements before sharding
        kept = sum(w.kept_bytes for w in walk)
        activations = kept / len(rank_stages) * in_flight(plan, rank) if pp > 1 else kept
        p2p_bytes = mb_tokens * profile.hidden_size * 4  # fp32 hidden states between stages
        comm = 4 * p2p_bytes * len(rank_stages) if pp > 1 else 0.0  # send + receive, forward + backward
        if pp > 1:
            p2p_time_bytes = tokens * profile.hidden_size * 4
            seconds += 2 * len(rank_stages) * p2p_seconds(hw, p2p_time_bytes, plan.plan_ngpus <= hw.gpus_per_node)
        # frozen weights (LoRA's base) hold their weight bytes only; from ZeRO level 1 on, 1/S of everything
        held_grads = 0.0 if plan.optimizer_in_backward else numel * grad_b / grad_shards  # never all at once
        states = (numel * (weight_b + optimizer_b) + (weights - numel) * weight_b) / shards + held_grads
        static = states - (0.0 if grads_persist else held_grads)
        unsharded = unsharded_weights(level, weights, edge_weights) * weight_b
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
        fwd_bwd, transient = current + gathered_layers, gathered_layers  # the forward's end (its last layers)
        backward = walk
        if plan.optimizer_in_backward:
            backward = gradients_stepped_in_backward(walk, pp == 1 and tied_head(profile, edge_tp))
        for kept_bytes, grad_bytes, backward_only in reversed(backward):
            if current + backward_only > fwd_bwd:
                fwd_bwd, transient = current + backward_only, backward_only
            current += grad_bytes - kept_bytes - (grad_bytes if grads_persist else 0.0)
        root_reduce = root_grads * (grad_b + reduce_b) if on_fsdp else 0.0
        fwd_bwd = max(fwd_bwd, current + root_reduce)
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
                offload_bytes=offload_bytes,
                offload_seconds=offload_seconds,
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
    optimizer_seconds = (
        numel * optimizer_step_bytes(profile.precision, work.optimizer_states) / shards / hw.hbm_bandwidth
    )
    device_seconds = work.grad_accu * pipeline + dp_seconds + optimizer_seconds
    host_seconds = passes * hw.host_seconds_per_pass  # the host runs ahead of the device, unless batches are small
    step = max(device_seconds, host_seconds) + work.new_lengths * hw.new_length_seconds
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
        device=device_seconds,
        host=host_seconds,
        offload_bytes=worst["offload_bytes"],  # copied to pinned host memory per micro-batch (and back)
        offload=work.grad_accu * m * max(r["offload_seconds"] for r in ranks),
    )
    return Cost(peak_bytes=worst["peak"], step_time=step, parts=parts)


def gradients_stepped_in_backward(walk: List[_Backward], tied: bool) -> List[_Backward]:
    """The backward walk of a plan whose optimizer steps each weight inside the backward (``optim/in_backward.py``):
    a gradient exists from its module's backward until its weight is stepped and it is freed, so no gradient is
    held: a module's working set is at least its own gradients (a layer's measured one already holds them), and
    the peak holds the largest module's at most. A head ``tied`` to the embedding hands its gradient to the
    embedding's weight, stepped once the embedding's backward adds its part: held from the head's backward to the
    embedding's. The step time is the same (the same kernels, run inside the backward)."""
    held = walk[0].grad_bytes if tied else 0.0  # one stage: walk[0] is the embedding, walk[-1] the head
    walk = [_Backward(w.kept_bytes, 0.0, max(w.backward_only, w.grad_bytes)) for w in walk]
    if tied:
        walk[0] = _Backward(walk[0].kept_bytes, -held, walk[0].backward_only)
        walk[-1] = _Backward(walk[-1].kept_bytes, held, walk[-1].backward_only)
    return walk


def tied_head(profile: ModelProfile, tp: int) -> bool:
    """Whether the LM head is the trained embedding's weight (tied): the profile counts its parameters once,
    in the embedding."""
    return profile.module(tp, "head").param_numel == 0 and profile.module(tp, "embed").local_trainable(tp) > 0


def _attention_seconds_factor(profile: ModelProfile, layout: BatchLayout, hw: Hardware) -> float:
    """The attention core's time per token against a full row's under causal SDPA (what the profile counts and
    ``efficiency`` was fitted on): its FLOPs scale with the span a token attends over, at its kernel's speed."""
    speed = hw.varlen_attention_speed if layout.kernel == VARLEN else 1.0
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
