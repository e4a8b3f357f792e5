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

from dataclasses import replace
from typing import Dict, Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ...errors import UserInputError
from ..model_spec import HEAD_COUNTS, spec_of
from .conv1d_parallel import Conv1DRowwiseParallel, PackedColwiseParallel


def tp_rules(hf_model: nn.Module) -> Dict[str, str]:
    """The model's tensor-parallel rules (``model_spec``): ``config.base_model_tp_plan`` (Llama, Mistral,
    Qwen2, ...), else the spec's own for the family (GPT-2, BERT-style encoders, T5)."""
    spec = spec_of(hf_model.config)
    reasons = spec.rule_reasons()
    if reasons:
        raise UserInputError(reasons[0])
    return dict(spec.tp_rules)


def check_divisible(config: PretrainedConfig, tp: int) -> None:
    """Raise a UserInputError when ``tp`` does not divide the heads, kv heads or FFN width of ``config``."""
    reasons = spec_of(config).tp_reasons(tp)
    if reasons:
        raise UserInputError(reasons[0])


def make_style(style: str, module: nn.Module, sequence_parallel: bool = False) -> ParallelStyle:
    """The ParallelStyle that applies ``style`` (one of :data:`STYLES`) to ``module``: torch's for
    ``nn.Linear`` and ``nn.Embedding``, this runtime's for transformers' ``Conv1D`` and for ``colwise_qkv``.
    ``sequence_parallel``: a rowwise projection reduce-scatters its output onto sequence shards."""
    if style == "colwise_qkv":
        return PackedColwiseParallel(parts=3)
    if isinstance(module, Conv1D):
        return PackedColwiseParallel() if style == "colwise" else Conv1DRowwiseParallel()
    if style == "colwise":
        return ColwiseParallel()
    return RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()


def apply_tensor_parallel(
    hf_model: nn.Module, tp_mesh: DeviceMesh, rules: Optional[Dict[str, str]] = None, sequence_parallel: bool = False
) -> int:
    """Shard ``hf_model``'s layers in place over the 1-D ``tp_mesh``; return the number of modules sharded.
    ``sequence_parallel``: rowwise projections leave their output on sequence shards (``sequence_parallel.py``).

    Every rank of ``tp_mesh`` must hold the same weights (same init seed or checkpoint) before the call.
    """
    spec = spec_of(hf_model.config)
    if rules is not None:
        spec = replace(spec, tp_rules=rules)
    reasons = spec.tp_reasons(tp_mesh.size())
    if reasons:
        raise UserInputError(reasons[0])
    base = _transformer(hf_model)
    modules = dict(base.named_modules())
    styles = spec.module_styles(base)
    plan = {}
    for name, style in styles.items():
        module = modules[name]
        plan.update(
            lora_plan(name, module, style)
            if is_lora_layer(module)
            else {name: make_style(style, module, sequence_parallel)}
        )
    if not plan:
        raise UserInputError(
            f"no module of {type(base).__name__} matches the tensor-parallel rules {sorted(spec.tp_rules)}"
        )
    parallelize_module(base, tp_mesh, plan)
    sharded = {name.rsplit(".", 1)[0] for name in styles}
    for name, module in base.named_modules():
        for attribute in HEAD_COUNTS.get(type(module).__name__, ()) if name in sharded else ():
            setattr(module, attribute, getattr(module, attribute) // tp_mesh.size())
    return len(plan)


def _transformer(hf_model: nn.Module) -> nn.Module:
    """The transformer the rules name modules of (``model.model`` of a Llama), also under a peft wrapper."""
    model = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    return model.base_model


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a projection wrapped by peft's LoRA (a base layer and A, B adapters)."""
    return all(hasattr(module, name) for name in ("base_layer", "lora_A", "lora_B"))


def lora_plan(name: str, module: nn.Module, style: str) -> Dict[str, ParallelStyle]:
    """The styles for a LoRA-wrapped projection ``name`` ruled ``style`` (see the module docstring)."""
    if style not in ("colwise", "rowwise") or type(module.base_layer) is not nn.Linear:
        raise UserInputError(
            f"LoRA on {name} ({type(module.base_layer).__name__}, tensor-parallel style {style}) "
            "is not available under tensor parallel: LoRA splits nn.Linear colwise and rowwise "
            "projections; leave this module out of LoRA's target_modules or use PLAN_NGPUS=1"
        )
    plan = {f"{name}.base_layer": make_style(style, module.base_layer)}
    split = "lora_B" if style == "colwise" else "lora_A"
    for adapter, linear in getattr(module, split).items():
        plan[f"{name}.{split}.{adapter}"] = make_style(style, linear)
    return plan


class EmbeddingRowwiseParallel(RowwiseParallel):
    """torch's ``RowwiseParallel`` for an embedding whose output feeds compiled blocks: the reduction of its
    partial rows completes before the output leaves (torch's runs it asynchronously, and the pending tensor
    it hands on, entering a compiled block, comes back in backward as a plain gradient where a DTensor is due)."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts)
        return outputs.to_local() if use_local_output else outputs


def apply_vocab_parallel(hf_model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard the input embedding and the LM head over the vocabulary.

    The embedding's rows are split (each rank looks up its slice, one all-reduce completes the
    vectors); the LM head's output features are split and its logits stay a DTensor sharded on the
    vocabulary dim, ``(B, T, V/tp)`` per rank. Compute the loss from them under
    ``torch.distributed.tensor.parallel.loss_parallel()`` (forward and backward), so no rank ever
    holds full-vocabulary logits.
    """
    embedding, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    if not spec_of(hf_model.config).vocab_parallel(tp_mesh.size(), 1, head is not None):
        raise UserInputError(
            f"vocab parallel over tp {tp_mesh.size()} needs an LM head untied from the input "
            f"embeddings (config.tie_word_embeddings false) and a vocabulary that tp divides"
        )
    embedding, head = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    parallelize_module(
        embedding, tp_mesh, EmbeddingRowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    )
    parallelize_module(
        head, tp_mesh, ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    )
