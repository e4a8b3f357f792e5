"""Profile a Hugging Face decoder without weights: parameters, activations and FLOPs per module.

The model is built from its config on the meta device (an 8B config in about a second, no memory), and
its tensor-parallel split follows the runtime's rules (``config.base_model_tp_plan`` through
``runtime.tensor_parallel.tp_rules``; vocab parallel embedding and LM head when the runtime would
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
import functools
import json
import os
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import UserInputError

# run.sh PRECISION: bf16 is autocast over fp32 weights, bf16-master / bf16-lean keep bf16 weights, fp16 is fairseq's
PRECISIONS = ("fp32", "bf16", "bf16-master", "bf16-lean", "fp16")
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16-master": torch.bfloat16, "bf16-lean": torch.bfloat16}
SHARDED_STYLES = ("colwise", "rowwise")
_PROFILE_LAYERS = 2  # two layers tell tensors shared by all layers (rotary cos/sin) from per-layer ones


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
class Lora:
    """LoRA adapters (run.sh ``USE_LORA=1``): their rank and the projection names ``target_modules`` lists.

    Only the adapters train: the base weights need no gradients or optimizer states, and their backward
    computes input gradients only (half a full finetune's backward FLOPs)."""

    rank: int
    targets: Tuple[str, ...]  # last name components of the adapted projections, or ("all-linear",)

    @classmethod
    def from_config(cls, lora_config: str, model_type: str) -> "Lora":
        """The adapters run.sh's ``LORA_CONFIG`` gives a model of ``model_type``, with peft's defaults (rank 8,
        its target modules for the family) where it names none."""
        from peft import LoraConfig
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

        from ..models.lora import parse_lora_config

        options = parse_lora_config(lora_config)
        targets = options.get("target_modules") or DEFAULT_TARGETS.get(model_type)
        if not targets:
            raise UserInputError(f"LORA_CONFIG names no target_modules and peft has no default for {model_type!r}; "
                                 "add target_modules=... (e.g. q_proj,v_proj)")
        return cls(rank=int(options.get("r", LoraConfig.r)), targets=tuple([targets] if isinstance(targets, str)
                                                                            else targets))


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
        return m["embed"].param_numel + self.num_layers * m["layers"].param_numel + m["norm"].param_numel \
            + m["head"].param_numel

    def module(self, tp: int, name: str) -> ModuleProfile:
        """``embed``, ``norm``, ``head``, or ``layers`` / ``layers.i`` (all layers are alike)."""
        return self.modules[tp]["layers" if name.startswith("layers") else name]

    def summary(self) -> List[dict]:
        """One row per module and tp degree, for printing."""
        rows = []
        for tp in self.tp_degrees:
            for name, m in self.modules[tp].items():
                rows.append(dict(tp=tp, module=name if name != "layers" else f"layers.* x{self.num_layers}",
                                 params=m.param_numel, local_params=m.local_numel(tp),
                                 act_bytes_per_token=m.activations.per_token,
                                 recompute_bytes_per_token={k: v[0].per_token for k, v in m.recompute.items()},
                                 fwd_flops_per_token=m.fwd_flops_per_token))
        return rows


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


def tp_rules_of(config) -> Dict[str, str]:
    """The runtime's tensor-parallel rules for this config (empty: the model only runs with tp=1)."""
    rules = getattr(config, "base_model_tp_plan", None) or {}
    return {pattern: style for pattern, style in rules.items() if style in SHARDED_STYLES}


def valid_tp_degrees(config, max_tp: int) -> List[int]:
    """tp degrees up to ``max_tp`` that divide heads, kv heads and FFN width (1 always; >1 needs tp rules)."""
    if not tp_rules_of(config):
        return [1]
    sizes = (config.num_attention_heads, _kv_heads(config), config.intermediate_size)
    return [tp for tp in range(1, max_tp + 1) if all(size % tp == 0 for size in sizes)]


def vocab_parallel(config, tp: int) -> bool:
    """The runtime's rule (``parallelize.vocab_parallel_possible``): untied LM head, vocabulary divisible."""
    return tp > 1 and not getattr(config, "tie_word_embeddings", False) and config.vocab_size % tp == 0


def profile_model(config, seq_len: int, precision: str = "fp32", tp_degrees=(1,),
                  attn_implementation: str = "sdpa", compiled: bool = False, lora: Optional[Lora] = None) -> ModelProfile:
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
    _check_decoder(config)
    full = _meta_model(config)
    layer = full.model.layers[0]
    layer_class = type(layer).__name__
    attention_class = type(getattr(layer, "self_attn", layer)).__name__
    mlp_class = type(getattr(layer, "mlp", layer)).__name__
    params = _param_split(full, config)
    adapters = _lora_split(full, config, lora) if lora is not None else None
    modules, shared, vocab, fused_head = {}, {}, {}, {}
    for tp in tp_degrees:
        vocab[tp] = vocab_parallel(config, tp)
        shard = _shard_config(config, tp, vocab[tp])
        measured, shared[tp] = _measure(shard, seq_len, precision, attn_implementation,
                                        (layer_class, attention_class, mlp_class))
        measured["layers"] = _with_layer_bytes(measured["layers"], layer_class,
                                               _layer_bytes_per_token(shard, seq_len, precision,
                                                                      attn_implementation, compiled))
        fused_head[tp] = None if vocab[tp] else fused_head_activations(config, precision, trains_weight=lora is None)
        h = config.hidden_size
        act_bytes = 4 if precision == "fp32" else 2
        rules = tp_rules_of(config)
        modules[tp] = {}
        for name, prof in measured.items():
            full_numel, sharded = params[name]
            counts = (0, 0)
            if tp > 1 and name == "layers":
                # DTensor: each rowwise output is all-reduced in forward; each colwise input's gradient in backward.
                styles = [style for pattern, style in rules.items() if pattern.startswith("layers.*.")]
                counts = (styles.count("rowwise"), styles.count("colwise"))
                comm = (counts[0] * h * act_bytes, counts[1] * h * act_bytes)
            elif tp > 1 and name == "embed" and vocab[tp]:
                counts, comm = (1, 0), (h * 4.0, 0.0)  # masked lookups summed over the vocabulary shards
            elif tp > 1 and name == "head" and vocab[tp]:
                counts, comm = (2, 1), (8.0, h * 4.0)  # loss_parallel's max and sum-exp; the input's gradient
            else:
                comm = (0.0, 0.0)
            module = ModuleProfile(name=name, param_numel=full_numel,
                                   sharded_numel=sharded if tp > 1 and (name in ("layers", "norm") or vocab[tp]) else 0,
                                   tp_allreduce_per_token=comm, tp_allreduce_count=counts, **prof)
            modules[tp][name] = module if adapters is None else _with_lora(module, adapters, tp)
    return ModelProfile(
        model_type=config.model_type, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads, num_kv_heads=_kv_heads(config),
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size, seq_len=seq_len,
        precision=precision, layer_class=layer_class, attention_class=attention_class, mlp_class=mlp_class,
        tp_degrees=tuple(tp_degrees), vocab_parallel=vocab, modules=modules, shared=shared, fused_head=fused_head,
        compiled=compiled)


def fused_head_activations(config, precision: str, compiled_softmax: bool = True,
                           trains_weight: bool = True) -> Activations:
    """The LM head under the fused chunked loss (``runtime/chunked_loss.py``), which computes its gradients in
    the forward: it keeps the hidden states' gradient (per token) and the head weight's (fixed), and while it
    runs holds a float32 sum of the weight's gradient, one chunk's logits and their gradient, and the chunk's
    weight-gradient product before it is added to the float32 sum. On GPUs the softmax-gradient step is
    compiled into two passes over the chunk; run eagerly (``compiled_softmax=False``, CPUs) it also holds three
    float32 chunk-sized intermediates and a boolean one-hot. A frozen head (LoRA, ``trains_weight=False``) has
    no weight gradient to keep or sum."""
    from ..criterions.lm_loss import CHUNK_ELEMENTS

    hidden, vocab = config.hidden_size, config.vocab_size
    weight_bytes = WEIGHT_DTYPES.get(precision, torch.float32).itemsize
    matmul_bytes = 4 if precision == "fp32" else 2  # autocast's bf16, or the bf16 / fp16 weights
    hidden_bytes = 4 if precision in ("fp32", "bf16") else 2  # under autocast the final norm gives float32
    transient = vocab * hidden * (4 + matmul_bytes) if weight_bytes != 4 and trains_weight else 0.0
    return Activations(per_token=hidden * hidden_bytes, fixed=vocab * hidden * weight_bytes if trains_weight else 0,
                       transient_per_token=vocab * (2 * matmul_bytes if compiled_softmax else matmul_bytes + 13),
                       transient_fixed=transient,
                       transient_max_tokens=max(512, CHUNK_ELEMENTS // vocab))


def _with_layer_bytes(layer: dict, layer_class: str, per_token: float) -> dict:
    """A decoder layer's profile with the bytes per token it keeps set to ``per_token`` (what AOTAutograd's
    partition saves); partial recompute (a sub-module's class) keeps the same share less than that."""
    eager = layer["activations"]
    scale = per_token / eager.per_token if eager.per_token else 1.0
    recompute = {cls: (kept if cls == layer_class else replace(kept, per_token=kept.per_token * scale), flops)
                 for cls, (kept, flops) in layer["recompute"].items()}
    return dict(layer, activations=replace(eager, per_token=per_token), recompute=recompute)


def _layer_bytes_per_token(config, seq_len: int, precision: str, attn_implementation: str, compiled: bool) -> float:
    """Bytes per token one decoder layer saves for backward: the layer traced on fake tensors by AOTAutograd
    and split into forward and backward as eager autograd does, or, ``compiled``, by the min-cut partitioner
    Inductor uses (it recomputes cheap elementwise results instead of saving them); the forward graph's saved
    outputs (distinct storages) at batch 2 less batch 1."""
    from torch._functorch.aot_autograd import aot_function, make_boxed_func
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.num_hidden_layers = 1
    config._attn_implementation = attn_implementation
    dtype = WEIGHT_DTYPES.get(precision, torch.float32)
    saved = []

    def keep_saved(graph_module, _inputs):
        outputs = next(n for n in graph_module.graph.nodes if n.op == "output").args[0]
        storages = {}
        for node in outputs[1:]:  # the first is the layer's output, the rest what backward needs
            value = getattr(node, "meta", {}).get("val")
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage()._cdata] = value.untyped_storage().nbytes()
        saved.append(sum(storages.values()))
        return make_boxed_func(graph_module)

    for batch in (1, 2):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        layer, rotary = model.base_model.layers[0], model.base_model.rotary_emb
        names = [name for name, _ in layer.named_parameters()]
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            hidden = torch.empty(batch, seq_len, config.hidden_size, dtype=dtype, requires_grad=True)
            positions = torch.arange(seq_len).unsqueeze(0)
            cos, sin = rotary(hidden, positions)

            def forward(hidden, cos, sin, *params):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = torch.func.functional_call(layer, dict(zip(names, params)), (hidden,),
                                                     dict(position_embeddings=(cos, sin), position_ids=positions))
                return out[0] if isinstance(out, tuple) else out

            partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor") if compiled \
                else default_partition
            traced = aot_function(forward, fw_compiler=keep_saved, bw_compiler=lambda gm, _: make_boxed_func(gm), partition_fn=partition)
            traced(hidden, cos, sin, *layer.parameters()).sum().backward()
    return (saved[1] - saved[0]) / seq_len


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _check_decoder(config) -> None:
    missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                 "vocab_size") if not getattr(config, name, None)]
    pp_plan = getattr(config, "base_model_pp_plan", None) or {}
    if missing or not {"embed_tokens", "layers", "norm"} <= set(pp_plan):
        raise UserInputError(
            f"the compile pass knows decoder models with embed_tokens, layers and norm (config.base_model_pp_plan, "
            f"e.g. Llama, Mistral, Qwen2); model type {config.model_type!r} is not one"
            + (f" (its config lacks {', '.join(missing)})" if missing else "")
            + "; write a PLAN_FILE by hand instead")


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _param_split(model, config) -> Dict[str, Tuple[int, int]]:
    """Module name -> (parameter elements, elements sharded by tp) under the runtime's rules.

    ``colwise`` and ``rowwise`` split a linear layer's weight (and a colwise bias; a rowwise bias is
    replicated); the embedding and LM head are split when vocab parallel (checked per tp by the caller:
    ``sharded_numel`` is only used for tp > 1, and vocab parallel depends on tp, so here the embedding
    and head count as sharded whenever their vocabulary could split at all).
    """
    rules = tp_rules_of(config)
    base = model.base_model
    out = {"embed": [0, 0], "layers": [0, 0], "norm": [0, 0], "head": [0, 0]}
    untied = not getattr(config, "tie_word_embeddings", False)
    for module_name, module in base.named_modules():
        if module_name.startswith("layers.") and not module_name.startswith("layers.0"):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            key = ("layers" if module_name.startswith("layers.") else
                   "embed" if module_name.startswith("embed_tokens") else
                   "norm" if module_name.startswith("norm") else None)
            if key is None:
                continue  # e.g. rotary embedding buffers: not parameters
            out[key][0] += param.numel()
            styles = {style for pattern, style in rules.items() if fnmatchcase(module_name, pattern)}
            if "colwise" in styles or ("rowwise" in styles and param_name == "weight"):
                out[key][1] += param.numel()
            elif key == "embed" and untied:
                out[key][1] += param.numel()
    head = model.get_output_embeddings()
    if head is not None and untied:
        numel = sum(p.numel() for p in head.parameters())
        out["head"] = [numel, numel]
    return {key: tuple(value) for key, value in out.items()}


def _lora_split(model, config, lora: Lora) -> Tuple[int, int]:
    """(adapter elements of one decoder layer, of which tp splits) for LoRA on ``lora.targets``: r x (in + out)
    per adapted projection; tp splits B of a colwise projection and A of a rowwise one (as
    ``runtime/tensor_parallel.py`` does)."""
    rules = tp_rules_of(config)
    numel = sharded = 0
    for name, module in model.base_model.layers[0].named_modules():
        if not isinstance(module, torch.nn.Linear) or not ({name.rsplit(".", 1)[-1], "all-linear"} & set(lora.targets)):
            continue
        out_features, in_features = module.weight.shape
        numel += lora.rank * (in_features + out_features)
        styles = {style for pattern, style in rules.items() if fnmatchcase(f"layers.0.{name}", pattern)}
        sharded += lora.rank * (out_features if "colwise" in styles else in_features if "rowwise" in styles else 0)
    if not numel:
        raise UserInputError(f"LoRA target_modules {list(lora.targets)} name no linear projection of the decoder "
                             "layers; the compile pass plans LoRA on them only")
    return numel, sharded


def _with_lora(module: ModuleProfile, adapters: Tuple[int, int], tp: int) -> ModuleProfile:
    """``module`` with its base weights frozen and, for the decoder layers, LoRA's adapters training. A frozen
    module's backward computes its input's gradient only (one forward's FLOPs; none for the embedding)."""
    if module.name != "layers":
        backward = 0.0 if module.name == "embed" else module.fwd_flops_per_token
        return replace(module, trainable=(0, 0), bwd_flops_per_token=backward)
    numel, sharded = adapters
    module = replace(module, param_numel=module.param_numel + numel, sharded_numel=module.sharded_numel + sharded,
                     trainable=(numel, sharded))
    adapter_flops = 2.0 * module.local_trainable(tp)  # a multiply-add per adapter weight on this rank
    return replace(module, fwd_flops_per_token=module.fwd_flops_per_token + adapter_flops,
                   bwd_flops_per_token=module.fwd_flops_per_token + 2 * adapter_flops)


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


def _measure(config, seq_len: int, precision: str, attn_implementation: str, class_names):
    """Run the shard model on fake tensors at batch 1 and 2; return per-module profile fields and shared bytes."""
    runs = [_Recorder(config, batch, seq_len, precision, attn_implementation, class_names).run()
            for batch in (1, 2)]

    def split(one: float, two: float) -> Tuple[float, float]:
        per_token = (two - one) / seq_len
        return per_token, max(0.0, one - per_token * seq_len)

    # A layer's backward rises above what it keeps by its gradients and its intermediates' gradients
    # (measured); a recomputed one also by the activations it rebuilds (kept without - kept with recompute).
    layer_class = runs[0]["layers"]["class"]

    def rise(cls):
        """Per token and fixed: the first layer's backward peak above where a module-by-module walk (each
        earlier backward: + its gradients - its kept activations) would have memory; so whatever a layer's
        backward leaves behind for the next one is counted (non-reentrant checkpoint holds some)."""
        values = []
        for batch, run in zip((1, 2), runs):
            kept = run["layers"]["kept"] if cls is None else run["layers"]["recompute"][cls]
            peak_first, before_last, grads = _backward_working_set(config, batch, seq_len, precision,
                                                                   attn_implementation, cls)
            values.append(peak_first - before_last - grads + kept)
        return split(*values)

    ws_per_token, ws_fixed = rise(None)
    rc_per_token, rc_fixed = rise(layer_class)  # recomputing the whole layer is measured: the common choice
    out = {}
    for name in ("embed", "layers", "norm", "head"):
        one, two = runs[0][name], runs[1][name]
        full = Activations(*split(one["kept"], two["kept"]))
        recompute = {}
        for cls, kept in one["recompute"].items():
            kept = Activations(*split(kept, two["recompute"][cls]))
            if cls == layer_class:
                up = (rc_per_token, rc_fixed)
            else:
                up = (full.per_token - kept.per_token + ws_per_token, full.fixed - kept.fixed + ws_fixed)
            recompute[cls] = (Activations(kept.per_token, kept.fixed, *up),
                              one["recompute_flops"][cls] / seq_len)
        if name == "layers":
            transient = (ws_per_token, ws_fixed)
        else:
            transient = ((two["transient"] - one["transient"]) / seq_len, 0.0)
        out[name] = dict(class_name=one["class"],
                         activations=Activations(full.per_token, full.fixed, *transient),
                         recompute=recompute, fwd_flops_per_token=one["flops"] / seq_len)
    return out, Activations(*split(runs[0]["shared"], runs[1]["shared"]))


def _backward_working_set(config, batch: int, seq_len: int, precision: str, attn_implementation: str,
                          recompute_cls: Optional[str] = None) -> Tuple[float, float, float]:
    """Run a two-layer copy of the model forward and backward on fake tensors under torch's ``MemTracker``
    (``recompute_cls`` recomputed with the runtime's ``apply_recompute``). Returns the peak memory during
    the first layer's backward, the memory just before the last layer's backward, and the last layer's
    parameter bytes (its gradients)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState
    from transformers import AutoModelForCausalLM

    from .runtime.recompute import apply_recompute

    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    config.num_hidden_layers = 2
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=WEIGHT_DTYPES.get(precision, torch.float32))
    if recompute_cls:
        apply_recompute(model, [recompute_cls])
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        ids = torch.randint(0, config.vocab_size, (batch, seq_len))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), ids.view(-1))
            del logits
            loss.backward()
    first, last = model.base_model.layers[0], model.base_model.layers[-1]

    def total(layer, state):
        return max(s[torch.device("cpu")]["Total"] for s in tracker.memory_tracking[layer].snapshots[state])

    grads = sum(p.numel() * p.element_size() for p in last.parameters())
    return total(first, _ModState.PEAK_BW), total(last, _ModState.PRE_BW), float(grads)


class _Recorder:
    """One fake forward + backward of a (shard) model, recording per top-level module: bytes autograd keeps
    (deduplicated by storage; parameters excluded, they are counted as weights), what recomputing a class
    would keep instead (its tensor inputs plus what the rest of the layer saves), and forward FLOPs."""

    def __init__(self, config, batch: int, seq_len: int, precision: str, attn_implementation: str, class_names):
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = attn_implementation
        self.batch, self.seq_len, self.precision = batch, seq_len, precision
        self.eager = attn_implementation == "eager"
        self.class_names = set(class_names)
        self.stack: List[Tuple[str, str]] = []  # (top-level module, class) of the modules running now
        self.saved: Dict[int, Tuple[int, set]] = {}  # storage id -> (bytes, owners: {(top, class)})
        self.inputs: Dict[Tuple[str, str], Dict[int, int]] = {}  # (top, class) -> {storage id: bytes}
        self.alive: List[torch.Tensor] = []

    def run(self) -> dict:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils.flop_counter import FlopCounterMode
        from transformers import AutoModelForCausalLM

        dtype = WEIGHT_DTYPES.get(self.precision, torch.float32)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        base = model.base_model
        tops = {"embed": base.embed_tokens, "norm": base.norm, "head": model.get_output_embeddings()}
        tops.update({f"layers.{i}": layer for i, layer in enumerate(base.layers)})
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")  # in place: ``tops`` stay the model's modules
            params = {p.untyped_storage()._cdata for p in model.parameters()}
            handles = [hook for top, module in tops.items() for sub in module.modules()
                       if sub is module or type(sub).__name__ in self.class_names
                       for hook in self._hook(top, sub)]

            def pack(t):
                sid = t.untyped_storage()._cdata
                if sid not in params:
                    owners = self.saved.setdefault(sid, (t.untyped_storage().nbytes(), set()))[1]
                    owners.update(self.stack or [("head", "loss")])  # the loss runs outside every module
                return t

            ids = torch.randint(0, self.config.vocab_size, (self.batch, self.seq_len))
            flops = FlopCounterMode(display=False)
            with flops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), ids.view(-1))
            # The loss's backward holds two fp32 logits-sized gradients at once (nll_loss's and log_softmax's),
            # and under autocast the low-precision gradient of the logits next.
            logits_grad_bytes = logits.numel() * (8 + (logits.element_size() if logits.element_size() < 4 else 0))
            loss.backward()
        for handle in handles:
            handle.remove()
        return self._collect(model, tops, flops.get_flop_counts(), logits_grad_bytes)

    def _hook(self, top: str, module):
        key = (top, type(module).__name__)

        def pre(mod, args, kwargs):
            self.stack.append(key)
            found = self.inputs.setdefault(key, {})
            for value in list(args) + list(kwargs.values()):
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        found[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
                        self.alive.append(t)  # a freed storage's id could be reused by a later tensor

        def post(mod, args, output):
            self.stack.pop()

        return module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)

    def _attention_core_flops(self) -> float:
        """QK^T and PV over the full T x T matrix, as FlopCounterMode counts SDPA; on the CPU the SDPA kernel
        is not counted, so it is added here (eager attention's matmuls are counted already)."""
        if self.eager:
            return 0.0
        return 4.0 * self.batch * self.seq_len ** 2 * self.config.head_dim * self.config.num_attention_heads

    def _collect(self, model, tops, flop_counts, logits_grad_bytes) -> dict:
        module_flops = {key.split(".", 1)[1]: float(sum(v.values())) for key, v in flop_counts.items() if "." in key}
        classes = {name: type(m).__name__ for name, m in model.named_modules()}
        fqns = {top: _fqn(model, module) for top, module in tops.items()}
        result = {top: {"kept": 0.0, "transient": 0.0, "class": type(module).__name__,
                        "flops": module_flops.get(fqns[top], 0.0), "recompute": {}, "recompute_flops": {}}
                  for top, module in tops.items()}
        result["shared"] = 0.0
        layer_tops = [top for top in tops if top.startswith("layers.")]
        for top in layer_tops:
            result[top]["flops"] += self._attention_core_flops()
        shared = set()
        for sid, (nbytes, owners) in self.saved.items():
            owner_tops = {top for top, _ in owners}
            if len(owner_tops) > 1:
                shared.add(sid)  # saved by several layers (rotary cos/sin), or by a layer and the next module
                result["shared"] += nbytes
            else:
                result[owner_tops.pop()]["kept"] += nbytes
        result["head"]["transient"] = float(logits_grad_bytes)
        for top in layer_tops:
            for cls in self.class_names:
                if (top, cls) not in self.inputs:
                    continue
                keep = {sid: nbytes for sid, (nbytes, owners) in self.saved.items()
                        if sid not in shared and {t for t, _ in owners} == {top} and (top, cls) not in owners}
                keep.update({sid: nbytes for sid, nbytes in self.inputs[(top, cls)].items() if sid not in shared})
                result[top]["recompute"][cls] = float(sum(keep.values()))
                result[top]["recompute_flops"][cls] = self._class_flops(fqns[top], cls, classes, module_flops)
        layers = {key: sum(result[t][key] for t in layer_tops) / len(layer_tops)
                  for key in ("kept", "transient", "flops")}
        for key in ("recompute", "recompute_flops"):
            layers[key] = {cls: sum(result[t][key][cls] for t in layer_tops) / len(layer_tops)
                           for cls in result[layer_tops[0]][key]}
        layers["class"] = result[layer_tops[0]]["class"]
        return {"embed": result["embed"], "layers": layers, "norm": result["norm"], "head": result["head"],
                "shared": result["shared"]}

    def _class_flops(self, layer_fqn: str, cls: str, classes, module_flops) -> float:
        """Forward FLOPs of the outermost modules of class ``cls`` in a layer: what recomputing them repeats."""
        names = [name for name in classes if (name == layer_fqn or name.startswith(layer_fqn + "."))
                 and classes[name] == cls]
        outermost = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
        total = sum(module_flops.get(name, 0.0) for name in outermost)
        if cls in (classes[layer_fqn], classes.get(f"{layer_fqn}.self_attn")):
            total += self._attention_core_flops()
        return total


def _fqn(model, module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise AssertionError("module not in model")
