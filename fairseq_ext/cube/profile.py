"""Profile a Hugging Face decoder without weights: parameters, activations and FLOPs per module.

The model is built from its config on the meta device (an 8B config in about a second, no memory), and
its tensor-parallel split follows the model spec's rules (``model_spec``: ``config.base_model_tp_plan`` and
registered module classes; vocab parallel embedding and LM head when the runtime would
use it). Activations and FLOPs are *measured*, not derived from formulas: a two-layer copy of the model
with the sizes one tensor-parallel rank holds (heads, kv heads, FFN width and, when vocab parallel, the
vocabulary divided by tp) runs forward and backward on fake tensors (``FakeTensorMode``: shapes and
dtypes, no data) under the run's precision, while ``saved_tensors_hooks`` record every tensor autograd
keeps for backward and ``FlopCounterMode`` counts the matmuls. Two batch sizes separate the bytes that
grow with tokens from those that do not (autocast's bf16 copies of the weights, kept until backward).

Per-token numbers are at the profiled sequence length: attention's seq-length dependence (eager
attention keeps ``T x T`` probabilities; SDPA/flash keeps an output and a log-sum-exp per row) is in
them, so a profile belongs to one SEQUENCE_LENGTH.

Module names: ``embed`` (input embedding), ``layers.i`` (decoder layers), ``norm`` (final norm),
``head`` (LM head with the loss: ``cross_entropy(logits.float())`` as the causal-LM criterion does).
"""

import copy
import json
import os
from typing import Dict, Optional, Tuple

import torch

from ..errors import UserInputError
from .lora_profile import Lora, lora_split, with_lora
from .model_spec import ModelSpec, spec_of
from .profile_memory import layer_bytes_per_token, with_layer_bytes
from .profile_recorder import measure_modules
from .profile_types import PRECISIONS, WEIGHT_DTYPES, Activations, ModelProfile, ModuleProfile
from .runtime.chunked_loss import chunk_rows

__all__ = [
    "PRECISIONS",
    "Activations",
    "Lora",
    "ModelProfile",
    "ModuleProfile",
    "fused_head_activations",
    "load_config",
    "profile_model",
]
_PROFILE_LAYERS = 2  # two layers tell tensors shared by all layers (rotary cos/sin) from per-layer ones


def load_config(path: str):
    """A Hugging Face config from a model folder or a ``config.json`` file (no weights, no tokenizer)."""
    from transformers import AutoConfig

    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"cannot read the model config {path}: {exc}") from None
        model_type = data.pop("model_type", None)
        if not model_type:
            raise UserInputError(f"{path} has no model_type; give a Hugging Face config.json")
        try:
            return AutoConfig.for_model(model_type, **data)
        except ValueError as exc:
            raise UserInputError(f"{path}: {exc}") from None
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise UserInputError(f"no model config at {path}: give a model folder with config.json, or the file")
    return AutoConfig.from_pretrained(path)


def profile_model(
    config,
    seq_len: int,
    precision: str = "fp32",
    tp_degrees=(1,),
    attn_implementation: str = "sdpa",
    compiled: bool = False,
    lora: Optional[Lora] = None,
) -> ModelProfile:
    """Profile ``config`` (a causal-LM decoder) at ``seq_len`` tokens for each tp degree.

    Args:
        precision: ``fp32``, ``bf16`` (autocast over fp32 weights) or ``fp16`` (weights in fp16).
        tp_degrees: tensor-parallel degrees to profile; each must divide heads, kv heads and FFN width.
        attn_implementation: ``sdpa`` (flash-style: no T x T kept) or ``eager``.
        compiled: the decoder layers run under ``torch.compile`` (run.sh ``COMPILE=1``): a layer keeps what
            the compiler's partitioner saves for backward (it recomputes cheap elementwise results instead).
        lora: LoRA adapters on the decoder layers' projections (the rest frozen); None: a full finetune.
    Raises:
        UserInputError: a model the compile pass cannot describe, an unknown precision.
    """
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    spec = spec_of(config)
    _check_decoder(config, spec)
    full = _meta_model(config)
    styles = spec.module_styles(full.base_model)  # module name -> tensor-parallel style
    layer = full.model.layers[0]
    layer_class = type(layer).__name__
    attention_class = type(getattr(layer, "self_attn", layer)).__name__
    mlp_class = type(getattr(layer, "mlp", layer)).__name__
    params = _param_split(full, config, styles)
    adapters = lora_split(full, styles, lora) if lora is not None else None
    modules, shared, vocab, fused_head = {}, {}, {}, {}
    for tp in tp_degrees:
        vocab[tp] = spec.vocab_parallel(tp, pp=1)
        shard = _shard_config(config, tp, vocab[tp])
        measured, shared[tp] = measure_modules(
            shard, seq_len, precision, attn_implementation, (layer_class, attention_class, mlp_class)
        )
        measured["layers"] = with_layer_bytes(
            measured["layers"],
            layer_class,
            layer_bytes_per_token(shard, seq_len, precision, attn_implementation, compiled),
        )
        fused_head[tp] = None if vocab[tp] else fused_head_activations(config, precision, trains_weight=lora is None)
        h = config.hidden_size
        act_bytes = 4 if precision == "fp32" else 2
        modules[tp] = {}
        for name, prof in measured.items():
            full_numel, sharded = params[name]
            counts = (0, 0)
            if tp > 1 and name == "layers":
                # DTensor: each rowwise output is all-reduced in forward; each colwise input's gradient in backward.
                layer_styles = [style for name, style in styles.items() if name.startswith("layers.0.")]
                counts = (layer_styles.count("rowwise"), layer_styles.count("colwise"))
                comm = (counts[0] * h * act_bytes, counts[1] * h * act_bytes)
            elif tp > 1 and name == "embed" and vocab[tp]:
                counts, comm = (1, 0), (h * 4.0, 0.0)  # masked lookups summed over the vocabulary shards
            elif tp > 1 and name == "head" and vocab[tp]:
                counts, comm = (2, 1), (8.0, h * 4.0)  # loss_parallel's max and sum-exp; the input's gradient
            else:
                comm = (0.0, 0.0)
            module = ModuleProfile(
                name=name,
                param_numel=full_numel,
                sharded_numel=sharded if tp > 1 and (name in ("layers", "norm") or vocab[tp]) else 0,
                tp_allreduce_per_token=comm,
                tp_allreduce_count=counts,
                **prof,
            )
            modules[tp][name] = module if adapters is None else with_lora(module, adapters, tp)
    return ModelProfile(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=_kv_heads(config),
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        seq_len=seq_len,
        precision=precision,
        layer_class=layer_class,
        attention_class=attention_class,
        mlp_class=mlp_class,
        tp_degrees=tuple(tp_degrees),
        vocab_parallel=vocab,
        modules=modules,
        shared=shared,
        fused_head=fused_head,
        compiled=compiled,
    )


def fused_head_activations(
    config, precision: str, compiled_softmax: bool = True, trains_weight: bool = True
) -> Activations:
    """The LM head under the fused chunked loss (``runtime/chunked_loss.py``), which computes its gradients in
    the forward: it keeps the hidden states' gradient (per token) and the head weight's (fixed), and while it
    runs holds a float32 sum of the weight's gradient, one chunk's logits and their gradient, and beside the sum
    its copy in the weight's dtype at the end (on CPUs, as large: each chunk's product before it is added). On GPUs the softmax-gradient step is
    compiled into two passes over the chunk; run eagerly (``compiled_softmax=False``, CPUs) it also holds three
    float32 chunk-sized intermediates and a boolean one-hot. A frozen head (LoRA, ``trains_weight=False``) has
    no weight gradient to keep or sum."""
    hidden, vocab = config.hidden_size, config.vocab_size
    weight_bytes = WEIGHT_DTYPES.get(precision, torch.float32).itemsize
    matmul_bytes = 4 if precision == "fp32" else 2  # autocast's bf16, or the bf16 / fp16 weights
    hidden_bytes = 4 if precision in ("fp32", "bf16") else 2  # under autocast the final norm gives float32
    transient = vocab * hidden * (4 + matmul_bytes) if weight_bytes != 4 and trains_weight else 0.0
    return Activations(
        per_token=hidden * hidden_bytes,
        fixed=vocab * hidden * weight_bytes if trains_weight else 0,
        transient_per_token=vocab * (2 * matmul_bytes if compiled_softmax else matmul_bytes + 13),
        transient_fixed=transient,
        transient_max_tokens=chunk_rows(vocab),
    )


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _check_decoder(config, spec: ModelSpec) -> None:
    missing = [
        name
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if not getattr(config, name, None)
    ]
    if missing or not spec.decoder:
        raise UserInputError(
            f"the compile pass knows decoder models with embed_tokens, layers and norm (config.base_model_pp_plan, "
            f"e.g. Llama, Mistral, Qwen2); model type {config.model_type!r} is not one"
            + (f" (its config lacks {', '.join(missing)})" if missing else "")
            + "; write a PLAN_FILE by hand instead"
        )


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _param_split(model, config, styles: Dict[str, str]) -> Dict[str, Tuple[int, int]]:
    """Module name -> (parameter elements, elements sharded by tp) under the runtime's ``styles``.

    ``colwise`` and ``rowwise`` split a linear layer's weight (and a colwise bias; a rowwise bias is
    replicated); the embedding and LM head are split when vocab parallel (checked per tp by the caller:
    ``sharded_numel`` is only used for tp > 1, and vocab parallel depends on tp, so here the embedding
    and head count as sharded whenever their vocabulary could split at all).
    """
    base = model.base_model
    out = {"embed": [0, 0], "layers": [0, 0], "norm": [0, 0], "head": [0, 0]}
    untied = not getattr(config, "tie_word_embeddings", False)
    for module_name, module in base.named_modules():
        if module_name.startswith("layers.") and not module_name.startswith("layers.0"):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            key = (
                "layers"
                if module_name.startswith("layers.")
                else "embed"
                if module_name.startswith("embed_tokens")
                else "norm"
                if module_name.startswith("norm")
                else None
            )
            if key is None:
                continue  # e.g. rotary embedding buffers: not parameters
            out[key][0] += param.numel()
            style = styles.get(module_name)
            if style == "colwise" or (style == "rowwise" and param_name == "weight"):
                out[key][1] += param.numel()
            elif key == "embed" and untied:
                out[key][1] += param.numel()
    head = model.get_output_embeddings()
    if head is not None and untied:
        numel = sum(p.numel() for p in head.parameters())
        out["head"] = [numel, numel]
    return {key: tuple(value) for key, value in out.items()}


def _shard_config(config, tp: int, vocab_parallel_on: bool):
    """The config of the model one tp rank computes: heads, kv heads, FFN width (and vocabulary) / tp."""
    shard = copy.deepcopy(config)
    shard.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shard.num_attention_heads = config.num_attention_heads // tp
    shard.num_key_value_heads = _kv_heads(config) // tp
    shard.intermediate_size = config.intermediate_size // tp
    if vocab_parallel_on:
        shard.vocab_size = config.vocab_size // tp
    shard.num_hidden_layers = _PROFILE_LAYERS
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(shard, name, None)
    return shard
