"""What the cube may do with a model, per family, in one place: the compile pass and the runtime both read it.

A :class:`ModelSpec` is built from a Hugging Face config (no weights) and says

- the tensor-parallel rules (module-name pattern under the base model -> style, Hugging Face's vocabulary):
  ``config.base_model_tp_plan`` for Llama-style families (Llama, Mistral, Qwen2, ...), this module's own
  for GPT-2, BERT-style encoders and T5, and the classes registered with ``cube/custom.py`` on top;
- the sizes tensor parallel splits, which every tp degree must divide;
- the decoder stack a pipeline cuts (Llama-style decoders: ``embed_tokens``, ``layers``, ``norm``) and the
  balanced stage layout (:func:`stage_layers`);
- when the embedding and LM head are vocab parallel (:meth:`ModelSpec.vocab_parallel`);
- every combination of a plan and the run's settings the runtime cannot run (:meth:`ModelSpec.unsupported`),
  each with what to change: the search lists such plans with these reasons and never picks them, the
  runtime refuses them with the same words.

The loss the pipeline's last stage computes is the task's criterion's own (``pipeline_loss`` of the criterion).
"""

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple

from ..optim.low_bit import PRECISION_STATES, low_bit_reasons
from .custom import CUSTOM_MODULES, STYLES, registered_rules
from .runtime.precision import FLOAT8, stored_as

if TYPE_CHECKING:  # annotations only: the spec is read without importing torch's or transformers' models
    import torch
    from transformers import PretrainedConfig

    from .plan import Plan

# Rules for families whose configs carry no base_model_tp_plan. Their attention views use -1 heads, so
# shards of 1/tp of the heads run unchanged.
_BERT_STYLE = {
    "encoder.layer.*.attention.self.query": "colwise",
    "encoder.layer.*.attention.self.key": "colwise",
    "encoder.layer.*.attention.self.value": "colwise",
    "encoder.layer.*.attention.output.dense": "rowwise",
    "encoder.layer.*.intermediate.dense": "colwise",
    "encoder.layer.*.output.dense": "rowwise",
}
# T5: self- and cross-attention and the FFN (gated or not); the relative position bias is an embedding of
# (buckets, heads), so it is split by heads like q, k and v.
_T5 = {
    **{f"*.{attention}.{proj}": "colwise" for attention in ("SelfAttention", "EncDecAttention") for proj in "qkv"},
    "*.SelfAttention.o": "rowwise",
    "*.EncDecAttention.o": "rowwise",
    "*.relative_attention_bias": "colwise",
    **{f"*.DenseReluDense.{wi}": "colwise" for wi in ("wi", "wi_0", "wi_1")},
    "*.DenseReluDense.wo": "rowwise",
}
# GPT-2: Conv1D projections; c_attn packs [q | k | v], which each rank takes its heads of.
_GPT2 = {
    "h.*.attn.c_attn": "colwise_qkv",
    "h.*.attn.c_proj": "rowwise",
    "h.*.mlp.c_fc": "colwise",
    "h.*.mlp.c_proj": "rowwise",
}
FALLBACK_RULES = {"bert": _BERT_STYLE, "roberta": _BERT_STYLE, "xlm-roberta": _BERT_STYLE, "t5": _T5, "gpt2": _GPT2}
# Families whose projections are transformers' Conv1D: LoRA (peft wraps nn.Linear) cannot be split with them.
_CONV1D_FAMILIES = ("gpt2",)
# Attributes that count heads in a family's attention modules and are used in its forward (T5 makes
# zero position biases of n_heads; GPT-2 splits c_attn's output in split_size q, k and v): divided by tp
# on the sharded modules.
HEAD_COUNTS = {"T5Attention": ("n_heads", "inner_dim"), "GPT2Attention": ("num_heads", "embed_dim", "split_size")}
DECODER_PARTS = ("embed_tokens", "layers", "norm")  # what a pipeline stage of a Llama-style decoder holds
CAUSAL_LM = "causal_lm"


@dataclass(frozen=True)
class RunSettings:
    """The run's settings that decide which plans can run (run.sh's names in the comments)."""

    precision: str = "fp32"  # PRECISION: fp32, bf16, bf16-master, bf16-lean, fp8, fp8-lean, or fp16 (fairseq's --fp16)
    fairseq_half: Tuple[str, ...] = ()  # fairseq's own --bf16 / --amp flags in use (--fp16 is precision fp16)
    compiled: bool = False  # COMPILE
    lora: bool = False  # USE_LORA
    packing: bool = False  # PACK_SEQUENCES
    sequence_parallel: bool = False  # SEQUENCE_PARALLEL
    head: str = CAUSAL_LM  # the hf_auto_* arch's head: causal_lm, seq2seq_lm, seq_cls, ...
    pipeline_loss: bool = True  # the criterion computes the pipeline's loss (``pipeline_loss``)
    batch_size: int = 1  # BATCH_SIZE; 0: batches by --max-tokens
    clip_norm: float = 0.0  # CLIP_NORM (--clip-norm)
    grad_accu: int = 1  # GRADIENT_ACCU_NUM (--update-freq)
    optimizer: str = "torch_adamw"  # --optimizer
    optimizer_states: str = PRECISION_STATES  # OPTIMIZER_STATES: precision, 8bit, 4bit (optim/low_bit.py)

    @property
    def half_flags(self) -> Tuple[str, ...]:
        """fairseq's half-precision flags the run uses (PRECISION=fp16 is fairseq's --fp16)."""
        return (("--fp16",) if self.precision == "fp16" else ()) + self.fairseq_half


@dataclass(frozen=True)
class ModelSpec:
    """One model family as the cube splits it (see the module docstring)."""

    model_type: str
    tp_rules: Mapping[str, str]  # pattern -> style, relative to the base model (``model.model`` of a Llama)
    tp_sizes: Mapping[str, int]  # config sizes tensor parallel splits: tp must divide each
    num_layers: int  # the decoder (or encoder) layers
    decoder: bool  # a Llama-style decoder stack (DECODER_PARTS) that a pipeline can cut
    tied_embeddings: bool
    vocab_size: int
    registered: bool = False  # classes registered with cube/custom.py may carry rules of their own
    llama_style: bool = False  # the rules are the config's base_model_tp_plan

    @property
    def has_tp_rules(self) -> bool:
        return bool(self.tp_rules) or self.registered

    def tp_degrees(self, max_tp: int) -> List[int]:
        """tp degrees up to ``max_tp`` that the model splits into (1 always)."""
        return [tp for tp in range(1, max_tp + 1) if not self.tp_reasons(tp)]

    def rule_reasons(self) -> List[str]:
        """Why the model cannot be split by tensor parallel at all (empty: its rules can be applied)."""
        if not self.has_tp_rules:
            return [
                f"model type {self.model_type!r} has no tensor-parallel rules (config.base_model_tp_plan, or "
                f"this runtime's for {', '.join(sorted(FALLBACK_RULES))}); use tp=1 for it, or register its "
                f"module types with fairseq_ext.cube.custom"
            ]
        unknown = sorted({style for style in self.tp_rules.values() if style not in STYLES})
        if unknown:
            return [
                f"tensor-parallel styles {unknown} of model type {self.model_type!r} are not supported "
                f"({', '.join(STYLES)} are); use tp=1 for it"
            ]
        return []

    def tp_reasons(self, tp: int) -> List[str]:
        """Why the model cannot be split over ``tp`` ranks (empty: it can)."""
        if tp == 1:
            return []
        return self.rule_reasons() + [
            f"tp {tp} does not divide {name} {size}; choose a tp that divides it"
            for name, size in self.tp_sizes.items()
            if size % tp
        ]

    def vocab_parallel(self, tp: int, pp: int, has_lm_head: bool = True) -> bool:
        """Whether the embedding and LM head are split over the vocabulary: with an LM head untied from the
        embedding, a vocabulary that ``tp`` divides, and no pipeline (which puts them on different stages)."""
        return tp > 1 and pp == 1 and has_lm_head and not self.tied_embeddings and self.vocab_size % tp == 0

    def unsupported(self, plan: "Plan", settings: RunSettings) -> List[str]:
        """Why the runtime cannot run ``plan`` (a :class:`~fairseq_ext.cube.plan.Plan`) on this model with
        ``settings``, each reason saying what to change; empty when it can."""
        reasons = list(self.tp_reasons(plan.tp))
        if plan.num_stages > self.num_layers:
            reasons.append(
                f"pp {plan.pp} x virtual_stages_per_rank {plan.virtual_stages_per_rank} = "
                f"{plan.num_stages} pipeline stages exceed num_hidden_layers {self.num_layers}; choose "
                f"at most {self.num_layers} stages"
            )
        if plan.stage_boundaries and plan.stage_boundaries[-1] >= self.num_layers:
            reasons.append(
                f"stage_boundaries {list(plan.stage_boundaries)} name layer {plan.stage_boundaries[-1]} "
                f"but the model has {self.num_layers} layers (0..{self.num_layers - 1}); every boundary "
                f"must be below {self.num_layers}"
            )
        if plan.pp == 1 and plan.num_microbatches > 1 and settings.head != CAUSAL_LM:
            reasons.append(
                f"{plan.num_microbatches} micro-batches without pipeline stages split causal LM batches "
                f"only, not the {settings.head} head's; use num_microbatches 1 (a smaller BATCH_SIZE "
                f"with GRADIENT_ACCU_NUM)"
            )
        if plan.zero > 1 and plan.scaling_factor > 1 and settings.half_flags:
            reasons.append(
                f"USE_ZERO={plan.zero} shards gradients with FSDP2, which {'/'.join(settings.half_flags)} cannot "
                f"run with (its optimizer flattens the parameters: data parallel runs on fairseq's DDP, ZeRO 1 "
                f"at most); use USE_ZERO=1 or 0, or PRECISION=bf16-master"
            )
        reasons += optimizer_in_backward_reasons(plan, settings)
        reasons += optimizer_states_reasons(plan, settings)
        if plan.plan_ngpus > 1:
            reasons += self._mesh_reasons(plan, settings)
        if plan.pp > 1:
            reasons += self._pipeline_reasons(plan, settings)
        return reasons

    def _mesh_reasons(self, plan: "Plan", settings: RunSettings) -> List[str]:
        reasons = []
        if settings.half_flags:
            reasons.append(
                f"{'/'.join(settings.half_flags)} with tensor or pipeline parallel (PLAN_NGPUS > 1) "
                f"is not available yet; use PRECISION=bf16, bf16-master or bf16-lean, or fp32"
            )
        if settings.precision in FLOAT8:
            reasons.append(
                f"PRECISION={settings.precision} with tensor or pipeline parallel (PLAN_NGPUS {plan.plan_ngpus}) is "
                f"not available yet (float8 linear layers are not split); use PLAN_NGPUS=1 (data parallel) or "
                f"PRECISION={stored_as(settings.precision)}"
            )
        if settings.compiled and plan.tp > 1 and settings.head != CAUSAL_LM:
            reasons.append(
                f"COMPILE=1 under tensor parallel (tp {plan.tp}) compiles blocks for one static shape, padding "
                f"causal LM batches to SEQUENCE_LENGTH, not the {settings.head} head's; use COMPILE=0 or tp 1"
            )
        if settings.sequence_parallel and plan.tp > 1:
            reasons += self._sequence_parallel_reasons(plan, settings)
        if plan.offload_modules:
            reasons.append(
                f"activation offloading (OFFLOAD_ACTIVATIONS=1, offload_modules) with tensor or pipeline parallel "
                f"(PLAN_NGPUS {plan.plan_ngpus}) is not available yet; use PLAN_NGPUS=1 or OFFLOAD_ACTIVATIONS=0"
            )
        if settings.lora and plan.tp > 1 and self.model_type in _CONV1D_FAMILIES:
            reasons.append(
                f"LoRA under tensor parallel splits nn.Linear projections; {self.model_type}'s are "
                f"Conv1D: use a plan with tp 1 or USE_LORA=0"
            )
        return reasons

    def _sequence_parallel_reasons(self, plan: "Plan", settings: RunSettings) -> List[str]:
        change = "use SEQUENCE_PARALLEL=0 or a plan with tp 1"
        if not (self.decoder and self.llama_style) or self.registered:
            return [
                f"SEQUENCE_PARALLEL=1 shards Llama-style decoders (rules from base_model_tp_plan, no registered "
                f"module types); model type {self.model_type!r} is not one: {change}"
            ]
        reasons = []
        if settings.head != CAUSAL_LM:
            reasons.append(f"SEQUENCE_PARALLEL=1 pads causal LM batches, not the {settings.head} head's: {change}")
        if settings.lora:
            reasons.append(f"SEQUENCE_PARALLEL=1 with LoRA is not available yet: {change}, or USE_LORA=0")
        if plan.pp > 1:
            reasons.append(f"SEQUENCE_PARALLEL=1 with pipeline parallel (pp {plan.pp}) is not available yet: {change}")
        return reasons

    def _pipeline_reasons(self, plan: "Plan", settings: RunSettings) -> List[str]:
        reasons = []
        if not self.decoder:
            reasons.append(
                f"pipeline parallel (pp {plan.pp}) splits Llama-style decoders (embed_tokens, layers, "
                f"norm); model type {self.model_type!r} is not one: use a plan with pp 1"
            )
        elif settings.head != CAUSAL_LM or not settings.pipeline_loss:
            reasons.append(
                f"pipeline parallel (pp {plan.pp}) runs the causal LM only (--arch hf_auto_causal_lm "
                f"with its criterion hf_causal_lm), not the {settings.head} head or this criterion; "
                f"use a plan with pp 1"
            )
        if self.tied_embeddings:
            reasons.append(
                f"pipeline parallel (pp {plan.pp}) needs untied input and output embeddings (the "
                f"model's config has tie_word_embeddings true); use a plan with pp 1"
            )
        if settings.compiled:
            reasons.append(
                f"COMPILE=1 with pipeline parallel (pp {plan.pp}) is not available yet; use COMPILE=0 or a plan "
                f"with pp 1"
            )
        if settings.lora:
            reasons.append(
                f"LoRA with pipeline parallel (pp {plan.pp}) is not available yet; use a plan with pp 1 or USE_LORA=0"
            )
        # batch_size 0 (MAX_TOKENS): a batch of any number of rows runs, padded with untrained rows to a
        # multiple of the micro-batches (``runtime/pipeline.py``)
        if settings.batch_size and settings.batch_size % plan.num_microbatches:
            reasons.append(
                f"BATCH_SIZE {settings.batch_size} is not divisible by the plan's num_microbatches "
                f"{plan.num_microbatches}; choose a BATCH_SIZE that is a multiple of "
                f"{plan.num_microbatches}, or num_microbatches that divides {settings.batch_size}"
            )
        return reasons

    def module_styles(self, base: "torch.nn.Module") -> Dict[str, str]:
        """Module name (under ``base``, the base model) -> style, for every module the rules split: the
        family's rules, replaced inside modules of registered classes by the registered ones (none: whole)."""
        styles = {
            name: style
            for name, _ in base.named_modules()
            for pattern, style in self.tp_rules.items()
            if name and fnmatchcase(name, pattern)
        }
        for prefix, module in base.named_modules():
            rules = registered_rules(type(module).__name__)
            if rules is None or not prefix:
                continue
            for name in [n for n in styles if n.startswith(prefix + ".")]:
                del styles[name]
            for child, _ in module.named_modules():
                for pattern, style in rules.items():
                    if child and fnmatchcase(child, pattern):
                        styles[f"{prefix}.{child}"] = style
        return styles


def optimizer_in_backward_reasons(plan: "Plan", settings: RunSettings) -> List[str]:
    """Why ``plan``'s optimizer step inside the backward (``optim/in_backward.py``) cannot give the numbers of
    the step after it with ``settings``, each with what to change; empty when it can, or when the plan has none.
    Any model: the runtime refuses the same for models that are not Hugging Face ones."""
    if not plan.optimizer_in_backward:
        return []
    off = "or OPTIMIZER_IN_BACKWARD=0 (and a PLAN_FILE without it)"
    reasons = []
    if settings.clip_norm > 0:
        reasons.append(
            f"OPTIMIZER_IN_BACKWARD=1 steps each weight as soon as its gradient is final, but gradient clipping "
            f"(--clip-norm {settings.clip_norm:g}) needs the norm of every gradient first; set CLIP_NORM=0 "
            f"(--clip-norm 0; run.sh's default is 1.0) {off}"
        )
    if settings.grad_accu > 1 or plan.num_microbatches > 1:
        what = f"GRADIENT_ACCU_NUM {settings.grad_accu}" if settings.grad_accu > 1 else ""
        if plan.num_microbatches > 1:
            what += (" and " if what else "") + f"{plan.num_microbatches} micro-batches inside the step"
        reasons.append(
            f"OPTIMIZER_IN_BACKWARD=1 frees each gradient once stepped, but {what} add up gradients over several "
            f"backwards (they must survive between them, so nothing is saved); use GRADIENT_ACCU_NUM=1 "
            f"(--update-freq 1) and a plan of one micro-batch, {off}"
        )
    if plan.world_size > 1 or plan.on_fsdp:
        reasons.append(
            f"OPTIMIZER_IN_BACKWARD=1 runs in one process without tensor, pipeline or data parallel, but this plan "
            f"runs {plan.world_size} process(es)"
            + (f" on FSDP2 (USE_ZERO={plan.zero})" if plan.on_fsdp else "")
            + f"; use NPROC_PER_NODE=1 NNODES=1 PLAN_NGPUS=1 USE_ZERO=0, {off}"
        )
    if settings.half_flags:
        reasons.append(
            f"OPTIMIZER_IN_BACKWARD=1 does not run with fairseq's {'/'.join(settings.half_flags)} (its loss scaling "
            f"decides after the backward whether the whole update is taken); use PRECISION=bf16-master, "
            f"bf16-lean, bf16 or fp32, {off}"
        )
    if settings.optimizer != "torch_adamw":
        reasons.append(
            f"OPTIMIZER_IN_BACKWARD=1 steps --optimizer torch_adamw only, got --optimizer {settings.optimizer}; "
            f"use torch_adamw (OPTIMIZE_PARAMS), {off}"
        )
    return reasons


def optimizer_states_reasons(plan: "Plan", settings: RunSettings) -> List[str]:
    """Why ``plan`` cannot run with ``settings``' low-bit optimizer states (``optim/low_bit.py``), each with what
    to change; empty when it can, or when the states are the precision's. Any model."""
    return low_bit_reasons(
        settings.optimizer_states,
        settings.precision,
        one_process=plan.world_size == 1 and not plan.on_fsdp,
        in_backward=plan.optimizer_in_backward,
        optimizer=settings.optimizer,
    )


def spec_of(config: "PretrainedConfig") -> ModelSpec:
    """The spec of the model ``config`` (a Hugging Face config) describes."""
    model_type = getattr(config, "model_type", "") or ""
    rules = getattr(config, "base_model_tp_plan", None) or FALLBACK_RULES.get(model_type) or {}
    pp_plan = getattr(config, "base_model_pp_plan", None) or {}
    layers = getattr(config, "num_hidden_layers", None) or 1
    return ModelSpec(
        model_type=model_type,
        tp_rules=dict(rules),
        tp_sizes=tp_sizes(config),
        num_layers=layers,
        decoder=set(DECODER_PARTS) <= set(pp_plan),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        vocab_size=getattr(config, "vocab_size", None) or 1,
        registered=bool(CUSTOM_MODULES),
        llama_style=bool(getattr(config, "base_model_tp_plan", None)),
    )


def tp_sizes(config: "PretrainedConfig") -> Dict[str, int]:
    """The sizes of ``config`` that tensor parallel splits (heads, kv heads, FFN width), by their config names."""
    sizes = {
        "num_attention_heads": getattr(config, "num_attention_heads", None),  # GPT-2's n_head, T5's num_heads
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
        "d_ff": getattr(config, "d_ff", None),  # T5's FFN width
        "n_inner": _n_inner(config),
    }  # GPT-2's
    return {name: size for name, size in sizes.items() if size is not None}


def _n_inner(config: "PretrainedConfig") -> Optional[int]:
    """GPT-2's FFN width: ``n_inner``, or 4 x ``n_embd`` when it is unset (as GPT2Block builds it)."""
    if not hasattr(config, "n_embd"):
        return None
    return getattr(config, "n_inner", None) or 4 * config.n_embd


def stage_layers(num_layers: int, num_stages: int, boundaries: Sequence[int] = ()) -> List[range]:
    """The decoder layers of each pipeline stage: ``boundaries`` (the first layer of stages 1..S-1), else
    balanced by count (the first ``num_layers % S`` stages get one more)."""
    if boundaries:
        starts = [0, *boundaries]
    else:
        size, extra = divmod(num_layers, num_stages)
        starts = [s * size + min(s, extra) for s in range(num_stages)]
    ends = [*starts[1:], num_layers]
    return [range(start, end) for start, end in zip(starts, ends)]
