"""Tensor parallel with DTensor: Hugging Face's tp-plan vocabulary applied with torch's ``parallelize_module``.

Rules map module names under the base model (``model.model`` of a Llama) to a style, as in
``config.base_model_tp_plan``: ``{"layers.*.self_attn.q_proj": "colwise", ...}``. ``colwise`` shards a
linear layer's output features, ``rowwise`` its input features and all-reduces the output, so an
attention or MLP block runs on ``1/tp`` of its heads or FFN width between one pair of collectives.
``colwise_qkv`` is ``colwise`` for one projection that packs q, k and v side by side (GPT-2's ``c_attn``):
each rank takes its heads of all three. transformers' ``Conv1D`` (GPT-2) is split by this runtime's
styles (``conv1d_parallel``), ``nn.Linear`` and ``nn.Embedding`` by torch's.
Modules no rule names (norms, and the embeddings unless :func:`apply_vocab_parallel` shards them) stay
replicated on every tensor-parallel rank. Module classes registered with
``fairseq_ext.cube.custom.register_module`` follow their own rules instead (or stay whole).

A projection that LoRA wraps (peft's ``lora.Linear``) is split with its adapters so that the update
``B(A(x))`` is sharded like the projection's own output: ``colwise``: the base layer and ``B`` split
their output features, ``A`` stays whole (its input gradient is completed by the base layer's all-reduce);
``rowwise``: the base layer and ``A`` split their input features (A's rank-r output is all-reduced, a few
numbers per token), ``B`` stays whole.
"""

from fnmatch import fnmatchcase
from typing import Dict, Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from transformers.pytorch_utils import Conv1D

from ...errors import UserInputError
from ..custom import CUSTOM_MODULES, STYLES, registered_rules
from .conv1d_parallel import Conv1DRowwiseParallel, PackedColwiseParallel


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
# Attributes that count heads in a family's attention modules and are used in its forward (T5 makes
# zero position biases of n_heads; GPT-2 splits c_attn's output in split_size q, k and v): divided by tp
# on the sharded modules.
HEAD_COUNTS = {"T5Attention": ("n_heads", "inner_dim"), "GPT2Attention": ("num_heads", "embed_dim", "split_size")}


def tp_rules(hf_model) -> Dict[str, str]:
    """The model's tensor-parallel rules: ``config.base_model_tp_plan`` (Llama, Mistral, Qwen2, ...), else
    this module's own for the family (BERT-style encoders)."""
    config = hf_model.config
    rules = getattr(config, "base_model_tp_plan", None) or FALLBACK_RULES.get(getattr(config, "model_type", None))
    if not rules and CUSTOM_MODULES:
        return {}  # registered module classes may carry all the rules
    if not rules:
        raise UserInputError(f"model type {config.model_type!r} has no tensor-parallel rules "
                             f"(config.base_model_tp_plan, or this runtime's for {', '.join(sorted(FALLBACK_RULES))}); "
                             "use tp=1 for it, or register its module types with fairseq_ext.cube.custom")
    unknown = {style for style in rules.values() if style not in STYLES}
    if unknown:
        raise UserInputError(f"tensor-parallel styles {sorted(unknown)} are not supported; use {sorted(STYLES)}")
    return dict(rules)


def check_divisible(config, tp: int) -> None:
    """Raise a UserInputError when ``tp`` does not divide the heads, kv heads or FFN width of ``config``."""
    sizes = {"num_attention_heads": getattr(config, "num_attention_heads", None),  # GPT-2's n_head too
             "num_key_value_heads": getattr(config, "num_key_value_heads", None),
             "intermediate_size": getattr(config, "intermediate_size", None),
             "d_ff": getattr(config, "d_ff", None),  # T5's FFN width
             "n_inner": _n_inner(config)}  # GPT-2's
    for name, size in sizes.items():
        if size is not None and size % tp:
            raise UserInputError(f"tp {tp} does not divide {name} {size}; choose a tp that divides it")


def _n_inner(config) -> Optional[int]:
    """GPT-2's FFN width: ``n_inner``, or 4 x ``n_embd`` when it is unset (as GPT2Block builds it)."""
    if not hasattr(config, "n_embd"):
        return None
    return getattr(config, "n_inner", None) or 4 * config.n_embd


def make_style(style: str, module) -> ParallelStyle:
    """The ParallelStyle that applies ``style`` (one of :data:`STYLES`) to ``module``: torch's for
    ``nn.Linear`` and ``nn.Embedding``, this runtime's for transformers' ``Conv1D`` and for ``colwise_qkv``."""
    if style == "colwise_qkv":
        return PackedColwiseParallel(parts=3)
    if isinstance(module, Conv1D):
        return PackedColwiseParallel() if style == "colwise" else Conv1DRowwiseParallel()
    return ColwiseParallel() if style == "colwise" else RowwiseParallel()


def apply_tensor_parallel(hf_model, tp_mesh: DeviceMesh, rules: Optional[Dict[str, str]] = None):
    """Shard ``hf_model``'s layers in place over the 1-D ``tp_mesh``; return the number of modules sharded.

    Every rank of ``tp_mesh`` must hold the same weights (same init seed or checkpoint) before the call.
    """
    rules = rules or tp_rules(hf_model)
    check_divisible(hf_model.config, tp_mesh.size())
    base = _transformer(hf_model)
    matched = {name: (module, style) for name, module in base.named_modules()
               for pattern, style in rules.items() if name and fnmatchcase(name, pattern)}
    plan = {}
    for name, (module, style) in matched.items():
        plan.update(lora_plan(name, module, style) if is_lora_layer(module) else {name: make_style(style, module)})
    apply_registered_modules(base, plan)
    if not plan:
        raise UserInputError(f"no module of {type(base).__name__} matches the tensor-parallel rules {sorted(rules)}")
    parallelize_module(base, tp_mesh, plan)
    sharded = {name.rsplit(".", 1)[0] for name in matched}
    for name, module in base.named_modules():
        for attribute in HEAD_COUNTS.get(type(module).__name__, ()) if name in sharded else ():
            setattr(module, attribute, getattr(module, attribute) // tp_mesh.size())
    return len(plan)


def _transformer(hf_model):
    """The transformer the rules name modules of (``model.model`` of a Llama), also under a peft wrapper."""
    model = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    return model.base_model


def is_lora_layer(module) -> bool:
    """Whether ``module`` is a projection wrapped by peft's LoRA (a base layer and A, B adapters)."""
    return all(hasattr(module, name) for name in ("base_layer", "lora_A", "lora_B"))


def lora_plan(name: str, module, style: str) -> Dict[str, ParallelStyle]:
    """The styles for a LoRA-wrapped projection ``name`` ruled ``style`` (see the module docstring)."""
    if style not in ("colwise", "rowwise") or type(module.base_layer) is not nn.Linear:
        raise UserInputError(f"LoRA on {name} ({type(module.base_layer).__name__}, tensor-parallel style {style}) "
                             "is not available under tensor parallel: LoRA splits nn.Linear colwise and rowwise "
                             "projections; leave this module out of LoRA's target_modules or use PLAN_NGPUS=1")
    plan = {f"{name}.base_layer": make_style(style, module.base_layer)}
    split = "lora_B" if style == "colwise" else "lora_A"
    for adapter, linear in getattr(module, split).items():
        plan[f"{name}.{split}.{adapter}"] = make_style(style, linear)
    return plan


def apply_registered_modules(base, plan: Dict[str, object]) -> None:
    """Replace, inside modules of registered classes, the model's rules by the registered ones (none: whole)."""
    for prefix, module in base.named_modules():
        rules = registered_rules(type(module).__name__)
        if rules is None or not prefix:
            continue
        for name in [n for n in plan if n.startswith(prefix + ".")]:
            del plan[name]
        for child, submodule in module.named_modules():
            for pattern, style in rules.items():
                if child and fnmatchcase(child, pattern):
                    plan[f"{prefix}.{child}"] = make_style(style, submodule)


def apply_vocab_parallel(hf_model, tp_mesh: DeviceMesh) -> None:
    """Shard the input embedding and the LM head over the vocabulary.

    The embedding's rows are split (each rank looks up its slice, one all-reduce completes the
    vectors); the LM head's output features are split and its logits stay a DTensor sharded on the
    vocabulary dim, ``(B, T, V/tp)`` per rank. Compute the loss from them under
    ``torch.distributed.tensor.parallel.loss_parallel()`` (forward and backward), so no rank ever
    holds full-vocabulary logits.
    """
    if getattr(hf_model.config, "tie_word_embeddings", False):
        raise UserInputError("vocab-parallel needs untied input and output embeddings "
                             "(config.tie_word_embeddings is true)")
    embedding, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    parallelize_module(head, tp_mesh, ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                                      use_local_output=False))
