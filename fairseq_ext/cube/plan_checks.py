"""The run's Plan applied to the model before fairseq's Trainer is built, and the settings it cannot run
with refused, each with what to change."""

import json
import logging
import os
from dataclasses import replace
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.device_mesh import DeviceMesh

from ..errors import UserInputError
from ..optim.low_bit import PRECISION_STATES
from .compile import check_plan_is_current
from .config import plan_from_config
from .model_spec import RunSettings, optimizer_in_backward_reasons, optimizer_states_reasons, spec_of
from .plan import Plan
from .runtime import float8, offload
from .runtime.compile_layers import compile_layers, repeated_block_classes
from .runtime.mesh import DP, PP, build_mesh, init_one_process_group
from .runtime.parallelize import apply_plan_recompute, parallelize
from .runtime.pipeline import PipelineRunner
from .runtime.precision import FLOAT8, check_precision, reduce_dtype, stored_as
from .runtime.recompute import parse_module_names as recompute_names

logger = logging.getLogger(__name__)


class AppliedPlan(NamedTuple):
    """The plan a run trains with and what applying it built."""

    plan: Plan
    mesh: Optional[DeviceMesh]  # (dp_replicate, dp_shard, pp, tp) and dp; None: one process, or fairseq's DDP
    vocab_parallel: bool  # whether the LM head's logits are sharded over the vocabulary
    pipeline: Optional[PipelineRunner]  # this rank's stages, for pp > 1
    data_parallel_roots: List[torch.nn.Module]  # the modules FSDP2 shards over the scale units (runtime/fsdp.py)


def runs_on_fairseq_ddp(plan: Plan, model, settings: RunSettings) -> bool:
    """Whether the data parallel of a plan of one GPU per scale unit runs on fairseq's DDP (with ZeRO-1 by
    torch's ZeroRedundancyOptimizer) instead of FSDP2: for models that are not Hugging Face ones (no
    repeated blocks to shard) and for fairseq's own --fp16/--bf16/--amp, whose optimizers flatten the
    parameters FSDP2 shards."""
    return plan.plan_ngpus == 1 and (getattr(model, "hf_model", None) is None or bool(settings.half_flags))


def apply_plan(cfg: DictConfig, model: torch.nn.Module, criterion: Optional[object] = None) -> AppliedPlan:
    """Resolve the run's Plan and, for a plan on a mesh (tensor or pipeline parallel, FSDP2 data parallel:
    several scale units, or one GPU at USE_ZERO >= 1), build the mesh and split and shard ``model``, then
    compile its decoder blocks under COMPILE=1; settings the plan cannot run with are refused with what to
    change."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    check_precision(getattr(cfg.task, "precision", "fp32"), optimizer=getattr(cfg.optimizer, "_name", None))
    plan = with_offload(cfg, model, plan_from_config(cfg.task, world_size, gpus_per_node))
    logger.info(f"cube plan: {json.dumps(plan.to_dict(), sort_keys=True)}")
    hf_config = getattr(getattr(model, "hf_model", None), "config", None)
    if hf_config is not None:
        precision = "fp16" if cfg.common.fp16 else getattr(cfg.task, "precision", "fp32")
        check_plan_is_current(
            plan,
            hf_config,
            seq_len=cfg.task.sequence_length,
            batch_size=cfg.dataset.batch_size or 0,
            grad_accu=cfg.optimization.update_freq[0],
            precision=precision,
            source=f"PLAN_FILE {cfg.task.plan_file}",
            compiled=getattr(cfg.model, "compile_layers", False),
            lora_config=cfg.model.lora_config if getattr(cfg.model, "use_lora", False) else None,
            sequence_parallel=bool(getattr(cfg.task, "sequence_parallel", False)),
            max_tokens=getattr(cfg.dataset, "max_tokens", None),
            optimizer_states=getattr(cfg.task, "optimizer_states", PRECISION_STATES),
        )
    settings = run_settings(cfg, model, criterion)
    if (plan.world_size == 1 and not plan.on_fsdp) or runs_on_fairseq_ddp(plan, model, settings):
        reasons = optimizer_in_backward_reasons(plan, settings) + optimizer_states_reasons(plan, settings)
        if reasons:
            raise UserInputError("; ".join(reasons))
        if plan.zero > 1 and plan.scaling_factor > 1:
            hf_model = getattr(model, "hf_model", None)
            reasons = (
                spec_of(hf_model.config).unsupported(plan, settings)
                if hf_model is not None
                else [
                    f"USE_ZERO={plan.zero} shards gradients with FSDP2, which runs Hugging Face models "
                    f"(--arch hf_auto_*); {type(model).__name__} trains on fairseq's DDP, ZeRO 1 at most: "
                    f"use USE_ZERO=1 or 0"
                ]
            )
            if reasons:
                raise UserInputError("; ".join(reasons))
        apply_plan_recompute(getattr(model, "hf_model", model), plan)
        offload.apply_plan_offload(getattr(model, "hf_model", model), plan)
        _compile_blocks(cfg, model, plan)
        return AppliedPlan(plan, None, False, None, [])
    hf_model = getattr(model, "hf_model", None)
    if hf_model is None:
        raise UserInputError(
            f"PLAN_NGPUS {plan.plan_ngpus} needs a Hugging Face model (--arch hf_auto_*), "
            f"got {type(model).__name__}; use PLAN_NGPUS=1"
        )
    reasons = spec_of(hf_model.config).unsupported(plan, settings)
    if reasons:
        raise UserInputError("; ".join(reasons) if len(reasons) < 3 else "\n  " + "\n  ".join(reasons))
    on_gpu = torch.cuda.is_available() and not cfg.common.cpu
    if plan.world_size == 1:
        init_one_process_group("cuda" if on_gpu else "cpu")  # fairseq starts one process without torch.distributed
    mesh = build_mesh(plan, "cuda" if on_gpu else "cpu")
    vocab_parallel, stages, roots = parallelize(
        hf_model,
        plan,
        mesh,
        root=model,
        sequence_parallel=settings.sequence_parallel,
        compile_blocks=lambda: _compile_blocks(cfg, model, plan),
        reduce_dtype=reduce_dtype(settings.precision, plan.scaling_factor) if settings.precision != "fp16" else None,
    )
    pipeline = None
    if stages:
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        pipeline = PipelineRunner(
            stages,
            plan,
            mesh.get_group(PP),
            device,
            token_loss=criterion.token_loss,
            pad_token_id=getattr(hf_model.config, "pad_token_id", None) or 0,
            dp_group=mesh.get_group(DP) if plan.scaling_factor > 1 else None,
        )
    return AppliedPlan(plan, mesh, vocab_parallel, pipeline, roots)


def with_offload(cfg: DictConfig, model: torch.nn.Module, plan: Plan) -> Plan:
    """``plan`` with OFFLOAD_ACTIVATIONS=1's (``--offload-activations``) decoder layers in ``offload_modules`` when
    the plan names none; a plan that offloads is checked against the recompute the model was built with
    (``--recompute-module-names``) and refused off CUDA (``offload.check_device``)."""
    if getattr(cfg.task, "offload_activations", False) and not plan.offload_modules:
        classes = repeated_block_classes(getattr(model, "hf_model", model))
        if not classes:
            raise UserInputError(
                f"OFFLOAD_ACTIVATIONS=1 offloads the decoder layers, and {type(model).__name__} names none "
                f"(no _no_split_modules); set OFFLOAD_ACTIVATIONS=0"
            )
        plan = replace(plan, offload_modules=tuple(sorted(classes)))
    if not plan.offload_modules:
        return plan
    built = tuple(recompute_names(getattr(cfg.model, "recompute_module_names", "") or ""))
    replace(plan, recompute_modules=plan.recompute_modules + built).validate()
    offload.check_device(torch.cuda.is_available() and not cfg.common.cpu)
    return plan.validate()


def _compile_blocks(cfg: DictConfig, model: torch.nn.Module, plan: Plan) -> None:
    """PRECISION=fp8: swap the decoder blocks' linear layers for float8 ones (``runtime/float8.py``); then
    COMPILE=1 (``--compile-layers``): compile each decoder block of the model as the plan left it (recompute
    wrappers, tensor-parallel shards in place), as torchtitan does. Tensor-parallel blocks get one static
    shape (``dynamic=False``; the trainer pads their batches to SEQUENCE_LENGTH, ``batch_padding.py``)."""
    hf_model = getattr(model, "hf_model", None)
    precision = getattr(cfg.task, "precision", "fp32")
    if precision in FLOAT8:
        if hf_model is None:
            raise UserInputError(
                f"PRECISION={precision} converts the decoder blocks of Hugging Face models (--arch hf_auto_*), "
                f"got {type(model).__name__}; use PRECISION={stored_as(precision)}"
            )
        on_gpu = torch.cuda.is_available() and not cfg.common.cpu
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        float8.check_device(device, precision)
        recipe = getattr(cfg.task, "float8_recipe", float8.RECIPES[0])
        count = float8.convert_blocks(
            hf_model, precision, recipe, getattr(cfg.task, "float8_min_width", float8.MIN_WIDTH)
        )
        logger.info(f"PRECISION={precision}: {count} linear layers multiply in float8 ({recipe} scales)")
    if getattr(cfg.model, "compile_layers", False) and hf_model is not None:
        count = compile_layers(hf_model, dynamic=False if plan.tp > 1 else None)
        logger.info(f"torch.compile: {count} decoder layers" + (", one static shape" if plan.tp > 1 else ""))


def run_settings(cfg: DictConfig, model: torch.nn.Module, criterion: Optional[object] = None) -> RunSettings:
    """The settings of this fairseq run that decide which plans it can run (``model_spec.RunSettings``)."""
    half = tuple(flag for flag, on in (("--bf16", cfg.common.bf16), ("--amp", cfg.common.amp)) if on)
    return RunSettings(
        precision="fp16" if cfg.common.fp16 else getattr(cfg.task, "precision", "fp32"),
        fairseq_half=half,
        compiled=bool(getattr(cfg.model, "compile_layers", False)),
        lora=bool(getattr(model, "saves_trainable_only", False)),
        packing=bool(getattr(cfg.task, "pack_sequences", False) or getattr(cfg.task, "padding_free", False)),
        sequence_parallel=bool(getattr(cfg.task, "sequence_parallel", False)),
        head=getattr(model, "layout", type(model).__name__),
        pipeline_loss=bool(
            getattr(model, "supports_pipeline", False)
            and getattr(criterion, "supports_pipeline", False)
            and hasattr(criterion, "token_loss")
        ),
        batch_size=cfg.dataset.batch_size or 0,
        clip_norm=float(cfg.optimization.clip_norm),
        grad_accu=int(cfg.optimization.update_freq[0]),
        optimizer=str(getattr(cfg.optimizer, "_name", "") or ""),
        optimizer_states=getattr(cfg.task, "optimizer_states", PRECISION_STATES),
    )
