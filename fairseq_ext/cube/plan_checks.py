"""The run's Plan applied to the model before fairseq's Trainer is built, and the settings it cannot run
with refused, each with what to change."""

import json
import logging
import os
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..errors import UserInputError
from .compile import check_plan_is_current
from .config import plan_from_config
from .plan import Plan
from .runtime.mesh import PP, build_mesh
from .runtime.parallelize import apply_plan_recompute, check_plan_fits_model, parallelize
from .runtime.pipeline import PipelineRunner
from .runtime.precision import check_precision

logger = logging.getLogger(__name__)


class AppliedPlan(NamedTuple):
    """The plan a run trains with and what applying it built."""

    plan: Plan
    mesh: Optional[DeviceMesh]  # (dp, pp, tp); None for plans of one GPU per scale unit
    vocab_parallel: bool  # whether the LM head's logits are sharded over the vocabulary
    pipeline: Optional[PipelineRunner]  # this rank's stages, for pp > 1


def apply_plan(cfg, model, criterion=None) -> AppliedPlan:
    """Resolve the run's Plan and, for a tensor- or pipeline-parallel one, build the mesh and split
    ``model``; settings the plan cannot run with are refused with what to change."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    check_precision(getattr(cfg.task, "precision", "fp32"), optimizer=getattr(cfg.optimizer, "_name", None))
    plan = plan_from_config(cfg.task, world_size, gpus_per_node)
    logger.info(f"cube plan: {json.dumps(plan.to_dict(), sort_keys=True)}")
    hf_config = getattr(getattr(model, "hf_model", None), "config", None)
    if hf_config is not None:
        precision = "fp16" if cfg.common.fp16 else getattr(cfg.task, "precision", "fp32")
        check_plan_is_current(plan, hf_config, seq_len=cfg.task.sequence_length,
                              batch_size=cfg.dataset.batch_size or 0, grad_accu=cfg.optimization.update_freq[0],
                              precision=precision, source=f"PLAN_FILE {cfg.task.plan_file}",
                              compiled=getattr(cfg.model, "compile_layers", False),
                              lora_config=cfg.model.lora_config if getattr(cfg.model, "use_lora", False) else None)
    if plan.plan_ngpus == 1:
        apply_plan_recompute(getattr(model, "hf_model", model), plan)
        return AppliedPlan(plan, None, False, None)
    hf_model = getattr(model, "hf_model", None)
    if hf_model is None:
        raise UserInputError(f"PLAN_NGPUS {plan.plan_ngpus} needs a Hugging Face model (--arch hf_auto_*), "
                             f"got {type(model).__name__}; use PLAN_NGPUS=1")
    if plan.pp > 1:
        check_pipeline_settings(cfg, plan, model, criterion)
    if cfg.common.fp16 or cfg.common.bf16 or cfg.common.amp:
        raise UserInputError("--fp16/--bf16/--amp with tensor parallel (PLAN_NGPUS > 1) are not available yet; "
                             "train in float32")
    if getattr(cfg.task, "pack_sequences", False) and plan.pp > 1:
        raise UserInputError("PACK_SEQUENCES=1 with pipeline parallel (pp > 1) is not available yet; use "
                             "PACK_SEQUENCES=0 or a plan without pipeline stages")
    if getattr(cfg.model, "compile_layers", False):
        raise UserInputError("COMPILE=1 (--compile-layers) with PLAN_NGPUS > 1 is not available yet; use COMPILE=0")
    check_plan_fits_model(plan, hf_model.config)
    on_gpu = torch.cuda.is_available() and not cfg.common.cpu
    mesh = build_mesh(plan, "cuda" if on_gpu else "cpu")
    vocab_parallel, stages = parallelize(hf_model, plan, mesh)
    pipeline = None
    if stages:
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        pipeline = PipelineRunner(stages, plan, mesh.get_group(PP), device,
                                  pad_token_id=getattr(hf_model.config, "pad_token_id", None) or 0)
    return AppliedPlan(plan, mesh, vocab_parallel, pipeline)


def check_pipeline_settings(cfg, plan, model, criterion) -> None:
    """What pipeline parallel does not run yet, refused with what to change instead."""
    if getattr(model, "saves_trainable_only", False):
        raise UserInputError(f"LoRA with pipeline parallel (pp {plan.pp}) is not available yet; use a plan "
                             f"with pp 1 (PLAN_NGPUS within one node) or USE_LORA=0")
    criterion_name = type(criterion).__name__ if criterion is not None else ""
    if not (getattr(model, "supports_pipeline", False) and getattr(criterion, "supports_pipeline", False)):
        raise UserInputError(f"pipeline parallel (pp {plan.pp}) runs the causal LM only (--arch hf_auto_causal_lm "
                             f"with its criterion hf_causal_lm), got {type(model).__name__} with "
                             f"{criterion_name or 'no criterion'}; use a plan with pp 1 for this head")
    if plan.zero:
        raise UserInputError(f"ZeRO-1 with pipeline parallel (pp {plan.pp}) is not available yet; "
                             f"set USE_ZERO=0 (zero false in the plan) or use a plan with pp 1")
    batch_size = cfg.dataset.batch_size
    if not batch_size:
        raise UserInputError(f"pipeline parallel (pp {plan.pp}) splits each batch into "
                             f"{plan.num_microbatches} micro-batches and needs a fixed --batch-size "
                             f"(BATCH_SIZE) instead of --max-tokens")
    if batch_size % plan.num_microbatches:
        raise UserInputError(f"BATCH_SIZE {batch_size} is not divisible by the plan's num_microbatches "
                             f"{plan.num_microbatches}; choose a BATCH_SIZE that is a multiple of "
                             f"{plan.num_microbatches}, or num_microbatches that divides {batch_size}")
