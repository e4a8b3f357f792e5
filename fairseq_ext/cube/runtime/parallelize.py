"""Apply a Plan to a Hugging Face model: the order of the runtime's techniques in one place."""

import logging
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..model_spec import spec_of
from ..plan import Plan
from .fsdp import shard_data_parallel
from .mesh import PP, TP, data_parallel_mesh
from .offload import apply_plan_offload
from .pipeline import check_pipeline_model, split_model
from .recompute import apply_recompute
from .sequence_parallel import apply_sequence_parallel
from .tensor_parallel import apply_tensor_parallel, apply_vocab_parallel

logger = logging.getLogger(__name__)


def apply_plan_recompute(module: torch.nn.Module, plan: Plan) -> None:
    """Recompute the plan's module classes (a plan file's; RECOMPUTE_MODULE_NAMES is applied at build time)."""
    if plan.recompute_modules and not any("checkpoint_wrapped" in n for n, _ in module.named_modules()):
        count = apply_recompute(module, plan.recompute_modules)
        logger.info(f"recompute: {count} modules ({', '.join(plan.recompute_modules)}) from the plan")


class Parallelized(NamedTuple):
    """What :func:`parallelize` did: whether the LM head is vocab parallel, this rank's pipeline stages
    (``[(stage_index, module)]``; empty without pipeline parallel), and the modules FSDP2 shards over the
    scale units (empty with one unit)."""

    vocab_parallel: bool
    stages: List[Tuple[int, torch.nn.Module]]
    data_parallel_roots: List[torch.nn.Module]


def parallelize(
    hf_model: torch.nn.Module,
    plan: Plan,
    mesh: DeviceMesh,
    root: Optional[torch.nn.Module] = None,
    sequence_parallel: bool = False,
    compile_blocks: Optional[Callable[[], None]] = None,
    reduce_dtype: Optional[torch.dtype] = None,
) -> Parallelized:
    """Split and shard ``hf_model`` in place as ``plan`` says, on the ``mesh`` of ``mesh.build_mesh``.

    Every rank must hold the same weights before the call. With pp > 1 the model is first cut to this
    rank's pipeline stages (see ``pipeline.split_model``), then the remaining layers are sharded over tp,
    then, with several scale units (or one GPU at a ZeRO level: ``Plan.on_fsdp``), ``root`` (the module whose
    forward training calls; default ``hf_model``) or each pipeline stage is sharded over them with FSDP2 at
    the plan's ZeRO level (``fsdp.py``).
    When the LM head is vocab parallel (pp 1 only) its logits are a DTensor sharded on the vocabulary, and
    the loss must be computed (forward and backward) under ``torch.distributed.tensor.parallel.loss_parallel()``.
    ``sequence_parallel`` (tp > 1): the norms and the hidden states between the tensor-parallel regions are
    sharded on the sequence (``sequence_parallel.py``). ``compile_blocks`` (float8 layers, COMPILE=1) is called after the
    tensor-parallel split and before FSDP2 sharding (torchtitan's order), so each compiled block traces its
    tensor-parallel forward. ``reduce_dtype``: what FSDP2 sums gradients in (``fsdp.shard_data_parallel``).
    """
    vocab_parallel, stages = _split(hf_model, plan, mesh, sequence_parallel)
    if compile_blocks is not None:
        compile_blocks()
    roots = []
    if plan.on_fsdp:
        roots = [module for _, module in stages] or [hf_model if root is None else root]
        shard_data_parallel(roots, hf_model, plan, data_parallel_mesh(mesh), reduce_dtype)
    return Parallelized(vocab_parallel, stages, roots)


def _split(hf_model, plan: Plan, mesh: DeviceMesh, sequence_parallel: bool):
    apply_plan_recompute(hf_model, plan)
    apply_plan_offload(hf_model, plan)
    # Recompute and offloading wrap layers in place, so it comes before the pipeline split, which keeps references to them.
    stages = []
    if mesh[PP].size() > 1:
        check_pipeline_model(hf_model, plan)
        stages = split_model(hf_model, plan, mesh.get_local_rank(PP))
    if plan.tp == 1:
        return False, stages
    tp_mesh = mesh[TP]
    num_sharded = apply_tensor_parallel(hf_model, tp_mesh, sequence_parallel=sequence_parallel)
    # With pp the embeddings and head live on different stages; they stay replicated over tp there.
    has_lm_head = hf_model.get_output_embeddings() is not None
    vocab_parallel = spec_of(hf_model.config).vocab_parallel(plan.tp, plan.pp, has_lm_head)
    if vocab_parallel:
        apply_vocab_parallel(hf_model, tp_mesh)
    else:
        logger.info(
            f"vocab parallel off (pipeline parallel, no LM head, tied embeddings, or vocabulary "
            f"{getattr(hf_model.config, 'vocab_size', None)} does not split over tp {plan.tp}): "
            f"embeddings and head stay replicated"
        )
    logger.info(
        f"tensor parallel: {num_sharded} modules sharded over tp {plan.tp}"
        + (", embeddings and LM head vocab parallel" if vocab_parallel else "")
    )
    if sequence_parallel:
        norms = apply_sequence_parallel(hf_model, tp_mesh)
        logger.info(f"sequence parallel: {norms} norms and the hidden states between them sharded over tp {plan.tp}")
    return vocab_parallel, stages
