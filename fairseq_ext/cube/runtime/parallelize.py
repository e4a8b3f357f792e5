"""Apply a Plan to a Hugging Face model: the order of the runtime's techniques in one place."""

import logging

from torch.distributed.device_mesh import DeviceMesh

from ...errors import UserInputError
from ..plan import Plan
from .mesh import PP, TP
from .recompute import apply_recompute
from .tensor_parallel import apply_tensor_parallel, apply_vocab_parallel

logger = logging.getLogger(__name__)


def check_plan_fits_model(plan: Plan, config) -> None:
    """Raise UserInputError when the model's config cannot be split as ``plan`` says.

    Sizes a config does not name (other families call them differently) are not checked here; the
    tensor-parallel rules of such a model are checked when they are applied.
    """
    heads = getattr(config, "num_attention_heads", None) or plan.tp
    plan.check_model(num_layers=getattr(config, "num_hidden_layers", None) or plan.num_stages,
                     num_heads=heads,
                     num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                     intermediate_size=getattr(config, "intermediate_size", None) or plan.tp)


def vocab_parallel_possible(hf_model, tp: int) -> bool:
    """Vocab parallel needs an LM head, untied embeddings and a vocabulary that splits evenly over tp."""
    config = hf_model.config
    return (hf_model.get_output_embeddings() is not None and not getattr(config, "tie_word_embeddings", False)
            and getattr(config, "vocab_size", 1) % tp == 0)


def parallelize(hf_model, plan: Plan, mesh: DeviceMesh) -> bool:
    """Shard ``hf_model`` in place as ``plan`` says, on the (dp, pp, tp) ``mesh``.

    Every rank must hold the same weights before the call. Returns whether the LM head is vocab parallel:
    then its logits are a DTensor sharded on the vocabulary, and the loss must be computed (forward
    and backward) under ``torch.distributed.tensor.parallel.loss_parallel()``.
    """
    if mesh[PP].size() > 1:
        raise UserInputError(f"pipeline parallel is not available yet (the plan has pp {plan.pp}); "
                             f"use a plan with pp 1")
    if plan.recompute_modules and not any("checkpoint_wrapped" in n for n, _ in hf_model.named_modules()):
        apply_recompute(hf_model, plan.recompute_modules)  # from a plan file; the flag applies it at build time
    tp_mesh = mesh[TP]
    num_sharded = apply_tensor_parallel(hf_model, tp_mesh)
    vocab_parallel = vocab_parallel_possible(hf_model, plan.tp)
    if vocab_parallel:
        apply_vocab_parallel(hf_model, tp_mesh)
    else:
        logger.info(f"vocab parallel off (no LM head, tied embeddings, or vocabulary {getattr(hf_model.config, 'vocab_size', None)} "
                    f"does not split over tp {plan.tp}): embeddings and head stay replicated")
    logger.info(f"tensor parallel: {num_sharded} modules sharded over tp {plan.tp}"
                + (", embeddings and LM head vocab parallel" if vocab_parallel else ""))
    return vocab_parallel
