"""What the compile pass knows of a model: the profile of each module (parameters, activations, FLOPs) as
one tensor-parallel rank sees it, for the cost model (``cost.py``); ``profile.py`` measures it."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

# run.sh PRECISION: bf16 is autocast over fp32 weights, bf16-master / bf16-lean / fp8 / fp8-lean keep bf16 weights,
# fp16 is fairseq's
PRECISIONS = ("fp32", "bf16", "bf16-master", "bf16-lean", "fp8", "fp8-lean", "fp16")
WEIGHT_DTYPES = {"fp16": torch.float16, **{p: torch.bfloat16 for p in ("bf16-master", "bf16-lean", "fp8", "fp8-lean")}}


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for backward, for one micro-batch, on one tensor-parallel rank.

    ``per_token * tokens + fixed``: ``fixed`` does not grow with tokens (autocast's low-precision weight
    copies). ``transient_*`` is how far memory rises while the module's backward runs, on top of what
    is kept (the LM head's logits gradients; a layer's parameter and intermediate gradients; the
    activations a recomputed layer rebuilds).
    """

    per_token: float
    fixed: float = 0.0
    transient_per_token: float = 0.0
    transient_fixed: float = 0.0
    transient_max_tokens: Optional[int] = None  # the per-token transient stops growing here (a chunk's rows)

    def bytes(self, tokens: int) -> float:
        """Kept for backward by a micro-batch of ``tokens`` tokens."""
        return self.per_token * tokens + self.fixed

    def backward_bytes(self, tokens: int) -> float:
        """The rise in memory while the module's backward runs, for ``tokens`` tokens."""
        if self.transient_max_tokens is not None:
            tokens = min(tokens, self.transient_max_tokens)
        return max(0.0, self.transient_per_token * tokens + self.transient_fixed)


@dataclass(frozen=True)
class ModuleProfile:
    """One module of the model (``embed``, ``layers.i``, ``norm``, ``head``) as one tp rank sees it.

    Attributes:
        param_numel: elements of the full module's parameters.
        sharded_numel: of those, the elements tensor parallel splits over tp (the rest is replicated).
        activations: kept for backward without recompute.
        recompute: for each class name whose recompute changes this module (the layer's own class and
            its attention / MLP classes), the activations kept when that class is recomputed, and the
            forward FLOPs per token that recompute adds.
        fwd_flops_per_token: forward FLOPs on this rank; backward is counted as twice forward.
        tp_allreduce_per_token: bytes per token all-reduced over tp in forward (rowwise outputs,
            vocab-parallel embedding) and in backward (inputs of colwise modules).
        tp_allreduce_count: how many all-reduces that is, (forward, backward), for their latency.
        attention_flops_per_token: of ``fwd_flops_per_token``, the attention core's (QK^T and PV over a full
            row of the profiled length, as FlopCounterMode counts SDPA); it grows with the span a token
            attends over (``batch_layout.py``), and its backward is twice it whether weights train or not.
    """

    name: str
    class_name: str
    param_numel: int
    sharded_numel: int
    activations: Activations
    recompute: Dict[str, Tuple[Activations, float]] = field(default_factory=dict)
    fwd_flops_per_token: float = 0.0
    tp_allreduce_per_token: Tuple[float, float] = (0.0, 0.0)
    tp_allreduce_count: Tuple[int, int] = (0, 0)
    # LoRA: (trainable elements, of which tp splits) of this module (its adapters; none for frozen modules) and
    # the backward FLOPs per token; None: every parameter trains and backward is twice the forward
    trainable: Optional[Tuple[int, int]] = None
    bwd_flops_per_token: Optional[float] = None
    attention_flops_per_token: float = 0.0

    def local_numel(self, tp: int) -> int:
        """Parameter elements one of ``tp`` ranks holds."""
        return self.sharded_numel // tp + (self.param_numel - self.sharded_numel)

    def local_trainable(self, tp: int) -> int:
        """Trained parameter elements (with gradients and optimizer states) one of ``tp`` ranks holds."""
        if self.trainable is None:
            return self.local_numel(tp)
        numel, sharded = self.trainable
        return sharded // tp + (numel - sharded)

    @property
    def backward_flops_per_token(self) -> float:
        return 2 * self.fwd_flops_per_token if self.bwd_flops_per_token is None else self.bwd_flops_per_token


@dataclass(frozen=True)
class ModelProfile:
    """Everything the cost model needs about one model at one sequence length, per tp degree."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    seq_len: int
    precision: str
    layer_class: str
    attention_class: str
    mlp_class: str
    tp_degrees: Tuple[int, ...]
    vocab_parallel: Dict[int, bool]
    # tp -> module name -> profile; the decoder layers are identical, so one "layers" entry stands for all.
    modules: Dict[int, Dict[str, ModuleProfile]]
    shared: Dict[int, Activations]  # kept once per micro-batch for all layers (rotary cos/sin)
    # tp -> the LM head with the fused chunked loss (the causal-LM criterion's default when the head is a plain
    # Linear: not vocab parallel, no pipeline); None where it is vocab parallel
    fused_head: Dict[int, Optional[Activations]] = field(default_factory=dict)
    compiled: bool = False  # decoder layers under torch.compile (COMPILE=1): activations as its partitioner keeps

    @property
    def param_numel(self) -> int:
        """Parameters of the whole model."""
        m = self.modules[self.tp_degrees[0]]
        return (
            m["embed"].param_numel
            + self.num_layers * m["layers"].param_numel
            + m["norm"].param_numel
            + m["head"].param_numel
        )

    def module(self, tp: int, name: str) -> ModuleProfile:
        """``embed``, ``norm``, ``head``, or ``layers`` / ``layers.i`` (all layers are alike)."""
        return self.modules[tp]["layers" if name.startswith("layers") else name]
