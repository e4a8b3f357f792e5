"""The one seam into fairseq's training loop: a Trainer subclass, installed from ``--user-dir`` import.

Each override says which fairseq behaviour it replaces. No other module of fairseq_ext patches fairseq.

Plans whose scale unit has one GPU (PLAN_NGPUS=1) are plain data parallel: fairseq's DDP path, with
ZeRO-1 on top. A tensor-parallel plan runs on a (dp, pp, tp) DeviceMesh: the model is sharded with
DTensor before the optimizer exists, fairseq's data-parallel rank, size and group become the mesh's dp
axis (all ranks of a scale unit read the same batch; logged sums run over dp only), gradients are
averaged over dp explicitly instead of by DDP, and the optimizer steps each rank's local shards.

A pipeline-parallel plan (pp > 1) also cuts the model to each rank's stages (``runtime/pipeline.py``);
the pipeline schedule runs forward and backward of each batch in place of the task's train and valid
steps, the last stage's loss is broadcast to the other stages (identical logging outputs on every rank),
the gradient norm sums over the stages.

Checkpoints (``--checkpoint-format``) are fairseq's one file with full tensors, gathered from every
shard and stage on the first rank (``full``), or fairseq's files kept small beside a folder into which
every rank writes its own shards with torch.distributed.checkpoint (``dcp``, the default for plans on a
mesh; ``sharded_checkpoint.py``). Both load under any plan and world size.
"""

import contextlib
import json
import logging
import os
import shutil
import sys

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils, utils
from fairseq import trainer as fairseq_trainer
from fairseq.distributed import ModuleProxyWrapper
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager
from fairseq.logging import metrics, progress_bar
from fairseq.nan_detector import NanDetector
from omegaconf import OmegaConf
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from ..criterions.base import logging_output
from ..errors import UserInputError
from .compile import check_plan_is_current
from .checkpoint_faults import failed_save
from .config import checkpoint_format, plan_from_config
from .finished_run import stop_if_complete
from .host_copies import HostCopy, LoggedValues, pinned
from .out_of_memory import SkippedBatches, is_out_of_memory, out_of_memory_error, skipping_allowed
from .runtime.data_parallel import average_gradients
from .runtime.local_shards import LocalShards, full_state_dict, local_tensor, localize_state_dict
from .runtime.mesh import DP, PP, TP, build_mesh
from .runtime.parallelize import apply_plan_recompute, check_plan_fits_model, parallelize
from .runtime.pipeline import PipelineRunner
from .runtime.precision import autocast, check_precision
from .runtime.recompute import state_dict_name
from .runtime.zero import shard_optimizer_states
from .sharded_checkpoint import (
    SHARDS_KEY,
    ModelShards,
    OptimizerShards,
    check_optimizer_by_parameter,
    check_shared_save_dir,
    has_strided_shards,
    load_model_shards,
    model_entries,
    optimizer_entries,
    optimizer_record,
    read_checkpoint,
    read_optimizer_shards,
    remove_unreferenced_shards,
    shards_left_on_disk,
    shards_record,
    write_shards,
)
from .speed_log import SpeedLog, batch_tokens, trained_tokens
from .step_profile import StepProfiler, parse_updates

logger = logging.getLogger(__name__)


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


class TensorParallelModel(torch.nn.Module):
    """What fairseq's Trainer holds in place of its DDP wrapper when the model is tensor parallel.

    Calls and missing attributes go to the model. fairseq calls ``all_reduce_grads`` after the last
    backward of an update (``reduce_grads``: the trainer averages them over the dp axis);
    ``state_dict`` gathers DTensors into full tensors (collective over tp), so a checkpoint loads in one
    process; ``load_state_dict`` takes such full tensors and keeps each rank's shard, or a sharded
    checkpoint's :class:`ModelShards` and reads this rank's shards (collective over all ranks).


    With pipeline parallel (``pipeline_group``) the module holds only this rank's stages: ``state_dict``
    also gathers the other stages' tensors (collective over the pp group) and ``load_state_dict`` keeps
    the entries of this rank's stages.
    """

    def __init__(self, module: torch.nn.Module, reduce_grads, pipeline_group=None, full_keys=()):
        super().__init__()
        self.module = module
        self._reduce_grads = reduce_grads
        self._pipeline_group = pipeline_group
        self._full_keys = list(full_keys)  # the single-process state_dict order

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def all_reduce_grads(self) -> None:
        self._reduce_grads()

    def state_dict(self, *args, **kwargs):
        state = full_state_dict(self.module.state_dict(*args, **kwargs))
        if self._pipeline_group is None:
            return state
        parts = gather_over(self._pipeline_group, {key: value.cpu() if torch.is_tensor(value) else value
                                                   for key, value in state.items()})
        merged = {key: value for part in parts for key, value in part.items()}
        order = {key: i for i, key in enumerate(self._full_keys)}
        return dict(sorted(merged.items(), key=lambda item: order.get(item[0], len(order))))

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        if isinstance(state_dict, ModelShards):
            return load_model_shards(self.module, state_dict)
        if self._pipeline_group is not None:
            mine = self.module.state_dict(keep_vars=True)
            state_dict = {key: value for key, value in state_dict.items() if key in mine}
        return self.module.load_state_dict(localize_state_dict(self.module, state_dict), strict=strict,
                                           model_cfg=model_cfg, args=args)


@contextlib.contextmanager
def _wrapped_task_steps(task, wrappers):
    """For the duration: ``task``'s methods named in ``wrappers`` replaced by ``wrapper(current method)``, then
    what was there before restored (an instance attribute such as the pipeline's step, or the class's)."""
    own = {name: vars(task)[name] for name in wrappers if name in vars(task)}
    for name, wrap in wrappers.items():
        setattr(task, name, wrap(getattr(task, name)))
    try:
        yield
    finally:
        for name in wrappers:
            if name in own:
                setattr(task, name, own[name])
            else:
                delattr(task, name)


def gather_over(group, obj):
    """``obj`` of every rank of ``group``, in group rank order (collective over ``group``)."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


class CubeTrainer(fairseq_trainer.Trainer):
    """fairseq's Trainer running a cube Plan: data parallel (DDP, also on CPU hosts), or tensor parallel
    on a DeviceMesh; ZeRO-1; checkpoints that are never left half-written."""

    def __init__(self, cfg, task, model, criterion, quantizer=None):
        # Names of the single-process model, before a pipeline plan cuts it to this rank's stages.
        self._full_keys = list(model.state_dict().keys())
        self._full_param_names = [state_dict_name(n) for n, p in model.named_parameters() if p.requires_grad]
        # The plan is applied before fairseq's __init__, which reads the data-parallel size and places the model.
        self.plan, self.mesh, self.vocab_parallel, self.pipeline = self._apply_plan(cfg, model, criterion)
        self.checkpoint_format = self._checkpoint_format(cfg, model)
        self._shards = None
        self._shards_folder = None  # the DCP folder written for the checkpoint being saved
        self._speed_log = None
        self._skipped_batches = SkippedBatches()
        self._norm_standin = (None, None)  # (what fairseq got for the gradient norm, the norm to log)
        self._unchecked_norm = None  # (HostCopy of a norm not yet known finite, the batches of its update)
        self._update_samples = None  # the batches of the update being run
        super().__init__(cfg, task, model, criterion, quantizer)
        speed_log = getattr(cfg.task, "speed_log", "")
        self._speed_log = SpeedLog(speed_log, self.device) if speed_log and distributed_utils.get_global_rank() == 0 \
            else None
        self._profiler = self._step_profiler(cfg)

    def _step_profiler(self, cfg):
        """``--profile-updates``: the profiler of this rank, or None."""
        updates = parse_updates(getattr(cfg.task, "profile_updates", ""))
        if updates is None:
            return None
        folder = getattr(cfg.task, "profile_dir", "") or os.path.join(
            os.path.dirname(os.path.abspath(cfg.checkpoint.save_dir)), "profile")
        return StepProfiler(updates, folder, distributed_utils.get_global_rank(), self.cuda)

    @staticmethod
    def _apply_plan(cfg, model, criterion=None):
        """Resolve the run's Plan and, for a tensor- or pipeline-parallel one, build the mesh and split
        ``model``. Returns (plan, mesh, vocab_parallel, pipeline runner or None)."""
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
            return plan, None, False, None
        hf_model = getattr(model, "hf_model", None)
        if hf_model is None:
            raise UserInputError(f"PLAN_NGPUS {plan.plan_ngpus} needs a Hugging Face model (--arch hf_auto_*), "
                                 f"got {type(model).__name__}; use PLAN_NGPUS=1")
        if plan.pp > 1:
            CubeTrainer._check_pipeline_settings(cfg, plan, model, criterion)
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
        return plan, mesh, vocab_parallel, pipeline

    def _checkpoint_format(self, cfg, model) -> str:
        """``--checkpoint-format`` resolved for this plan, and what a sharded checkpoint cannot hold refused."""
        resolved = checkpoint_format(cfg.task, self.mesh is not None)
        if resolved == "dcp" and has_strided_shards(model):
            if getattr(cfg.task, "checkpoint_format", "auto") == "dcp":
                raise UserInputError("--checkpoint-format dcp cannot write this model's fused q/k/v shards (GPT-2 "
                                     "style, each rank its heads of q, k and v); use --checkpoint-format full "
                                     "(CHECKPOINT_FORMAT=full) or auto")
            resolved = "full"  # auto: gathered on the first rank, as for one process
        if resolved == "dcp" and cfg.ema.store_ema:
            raise UserInputError("--store-ema keeps a full copy of the model in the checkpoint; use "
                                 "--checkpoint-format full (CHECKPOINT_FORMAT=full) with it")
        if resolved == "dcp" and PathManager.path_requires_pathmanager(cfg.checkpoint.save_dir):
            raise UserInputError(f"--checkpoint-format dcp writes to local folders; --save-dir "
                                 f"{cfg.checkpoint.save_dir} is remote: use --checkpoint-format full")
        if resolved == "dcp" and not cfg.checkpoint.no_save:
            check_shared_save_dir(cfg.checkpoint.save_dir)
        logger.info(f"checkpoints: {resolved} (--checkpoint-format {getattr(cfg.task, 'checkpoint_format', 'auto')})")
        return resolved

    @staticmethod
    def _check_pipeline_settings(cfg, plan, model, criterion) -> None:
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

    @property
    def data_parallel_world_size(self):
        """Replaces fairseq's data-parallel size (the whole world) by the mesh's dp axis: the scale units."""
        if self.mesh is None:
            return super().data_parallel_world_size
        return self.mesh[DP].size()

    @property
    def data_parallel_rank(self):
        """Replaces fairseq's data-parallel rank (the global rank) by this rank's scale unit, so that every
        rank of a unit reads the same batches and only units are counted in logged sums."""
        if self.mesh is None:
            return super().data_parallel_rank
        return self.mesh.get_local_rank(DP)

    @property
    def data_parallel_process_group(self):
        """Replaces fairseq's data-parallel group (the global one) by this rank's dp group of the mesh:
        logging sums, checkpoint broadcasts and the grad-norm consistency check run over it."""
        if self.mesh is None:
            return super().data_parallel_process_group
        return self.mesh.get_group(DP)

    @property
    def use_distributed_wrapper(self) -> bool:
        """A tensor-parallel model is never wrapped in DDP: its gradients are reduced by :meth:`_reduce_grads`."""
        if self.mesh is not None:
            return False
        return super().use_distributed_wrapper

    @property
    def model(self):
        """Replaces fairseq's DDP wrapping: on CPU hosts, fairseq passes CUDA ``device_ids`` that DDP rejects
        for CPU modules (same DDP settings otherwise; GPU runs keep fairseq's wrapper); a tensor-parallel
        model gets :class:`TensorParallelModel` instead of a DDP wrapper."""
        if self._wrapped_model is None and self.mesh is not None:
            self._wrapped_model = TensorParallelModel(
                self._model, self._reduce_grads, self.mesh.get_group(PP) if self.pipeline else None,
                self._full_keys)
        if self._wrapped_model is None and self.use_distributed_wrapper and self.device.type == "cpu":
            dt = self.cfg.distributed_training
            self._wrapped_model = ModuleProxyWrapper(DistributedDataParallel(
                self._model, process_group=self.data_parallel_process_group,
                broadcast_buffers=dt.broadcast_buffers, bucket_cap_mb=dt.bucket_cap_mb,
                find_unused_parameters=dt.find_unused_parameters, gradient_as_bucket_view=dt.gradient_as_bucket_view))
        return super().model

    def _build_optimizer(self):
        """Adds to fairseq's optimizer: stepping local shards of a tensor-parallel model, and ZeRO-1.

        With tensor parallel the optimizer's parameters become each rank's local shards (plain tensors
        sharing storage with the DTensors), so fairseq's gradient scaling, its optimizers and ZeRO work
        unchanged; its state_dict is gathered to full tensors for checkpoints and cut back on load.
        ZeRO-1 (``--use-zero``): fairseq's own ``--zero-sharding os`` needs fairscale, which is
        unmaintained; this uses torch's ZeroRedundancyOptimizer among the replicas of each parameter
        shard (the dp group), and fairseq's ``consolidate_optimizer`` before checkpoints already calls
        its ``consolidate_state_dict``.
        """
        super()._build_optimizer()
        fairseq_optimizer = self._optimizer
        if self.mesh is not None:
            inner = fairseq_optimizer.optimizer
            self._shards = LocalShards((p for group in inner.param_groups for p in group["params"]),
                                       pipeline_group=self.mesh.get_group(PP) if self.pipeline else None)
            view_of = {id(p): v for p, v in zip(self._shards.params, self._shards.views)}
            for group in inner.param_groups:
                group["params"] = [view_of[id(p)] for p in group["params"]]
            self._gather_optimizer_state_in_checkpoints(fairseq_optimizer)
        if self.plan.zero and self.data_parallel_world_size > 1:
            replica_groups = None
            if self.mesh is not None:
                ranks = self.mesh.mesh  # (dp, pp, tp) -> global rank
                replica_groups = [ranks[:, pp, tp].tolist() for pp in range(ranks.shape[1])
                                  for tp in range(ranks.shape[2])]
            fairseq_optimizer.optimizer = shard_optimizer_states(
                fairseq_optimizer.optimizer, fairseq_optimizer.optimizer_config, self.plan.zero_n_groups,
                replica_groups)
            logger.info(f"ZeRO-1: optimizer states sharded among {self.data_parallel_world_size} replicas "
                        f"in {self.plan.zero_n_groups} group(s)")
        if self.checkpoint_format == "dcp":
            check_optimizer_by_parameter(fairseq_optimizer.optimizer, self._optimizer_params())

    def _optimizer_params(self):
        """(state_dict name, model parameter) of each tensor the optimizer steps on this rank, in its order."""
        return [(state_dict_name(n), p) for n, p in self._model.named_parameters() if p.requires_grad]

    def _gather_optimizer_state_in_checkpoints(self, fairseq_optimizer):
        """Replaces the fairseq optimizer's ``state_dict``/``load_state_dict`` (on this instance) by ones that
        give and take full tensors, as the model's do, so a tensor-parallel checkpoint loads in one process;
        ``load_state_dict`` also takes a sharded checkpoint's :class:`OptimizerShards` (this rank's states
        read from its folder, collective over all ranks)."""
        shards, state_dict, load_state_dict = self._shards, fairseq_optimizer.state_dict, fairseq_optimizer.load_state_dict

        def views():
            return [p for group in fairseq_optimizer.optimizer.param_groups for p in group["params"]]

        pipeline_group = self.mesh.get_group(PP) if self.pipeline else None
        global_index = self._global_param_indices() if pipeline_group is not None else None

        def full_state_dict_():
            state = shards.full_optimizer_state(state_dict(), views())
            if pipeline_group is None:
                return state
            return merge_stage_optimizer_states(gather_over(pipeline_group, to_global_indices(state, global_index)))

        def load_local_state_dict(state, optimizer_overrides=None):
            if isinstance(state, OptimizerShards):
                local = read_optimizer_shards(state, fairseq_optimizer.optimizer, self._optimizer_params())
                return load_state_dict(local, optimizer_overrides)
            if pipeline_group is not None:
                state = to_local_indices(state, global_index)
            return load_state_dict(shards.local_optimizer_state(state, views()), optimizer_overrides)

        fairseq_optimizer.state_dict = full_state_dict_
        fairseq_optimizer.load_state_dict = load_local_state_dict

    def _global_param_indices(self):
        """For each parameter the optimizer steps on this rank, its index among the single-process
        model's trainable parameters (the optimizer state keys of a one-process checkpoint)."""
        index = {name: i for i, name in enumerate(self._full_param_names)}
        local = [state_dict_name(n) for n, p in self._model.named_parameters() if p.requires_grad]
        return [index[name] for name in local]

    def _reduce_grads(self) -> None:
        """Average the gradients of a tensor-parallel model over the dp axis (what DDP does otherwise)."""
        self._shards.link_grads()
        average_gradients(self._shards.local_grads(), self.data_parallel_process_group)

    def zero_grad(self):
        """Also clears the model's DTensor gradients, which the optimizer (stepping local views) does not see."""
        super().zero_grad()
        if self.mesh is not None:
            for param in self._model.parameters():
                param.grad = None

    def clip_grad_norm(self, clip_norm):
        """Replaces fairseq's norm of the local gradients: with tensor parallel, the norm of the full
        gradient (sharded squares summed over tp, replicated ones counted once), then clipped alike.

        On one data-parallel replica of a GPU with ``torch_adamw``, the optimizer step is launched without
        waiting for the norm: fairseq's finiteness check before the step (a wait for the whole backward)
        gets a stand-in, the step skips itself on the device where the norm is not finite, and the norm is
        checked once later work is queued (:meth:`_check_previous_norm`)."""
        clip = self._clip_grad_norm if self._speed_log is None else self._speed_log.timed(self._clip_grad_norm)
        norm = clip(clip_norm)
        skip_on_device = getattr(self.optimizer, "skip_step_if_nonfinite", None)
        if (self.cuda and torch.is_tensor(norm) and self._grad_norm_buf is None and not self.cfg.common.amp
                and skip_on_device and skip_on_device(norm)):
            self._unchecked_norm = (HostCopy(norm), self._update_samples)
            self._norm_standin = (torch.zeros(()), norm)
            return self._norm_standin[0]
        return norm

    def _check_previous_norm(self, fairseq_saves_crash: bool = False) -> None:
        """fairseq's "gradients are Nan/Inf" error for an update whose step was launched before its gradient
        norm was known (a step that then changed nothing): as fairseq does, crash.pt is saved (here, unless
        fairseq is about to save it) and that update's batches run again under fairseq's NanDetector, which
        names the first module that gave a non-finite value; then the error is raised."""
        if self._unchecked_norm is None:
            return
        (norm, samples), self._unchecked_norm = self._unchecked_norm, None
        if torch.isfinite(norm.get()).all():
            return
        if not fairseq_saves_crash:
            self.consolidate_optimizer()
            self.save_checkpoint(os.path.join(self.cfg.checkpoint.save_dir, "crash.pt"), {})
        self.zero_grad()
        with NanDetector(self.get_model()):
            for sample in samples or []:
                sample, _ = self._prepare_sample(sample)
                self.task.train_step(sample, self.model, self.criterion, self.optimizer, self.get_num_updates(),
                                     ignore_grad=False)
        raise FloatingPointError("gradients are Nan/Inf")

    def _clip_grad_norm(self, clip_norm):
        if self.mesh is None:
            return super().clip_grad_norm(clip_norm)
        if hasattr(self.optimizer, "apply_grad_multiplier"):
            self.optimizer.apply_grad_multiplier()  # the norm below reads the gradients themselves
        total_norm = self._shards.grad_norm()
        if clip_norm > 0:
            grads = self._shards.local_grads()
            clip_coef = (float(clip_norm) / (total_norm + 1e-6)).clamp_(max=1)
            torch._foreach_mul_(grads, clip_coef.to(grads[0].device))
        return total_norm

    def _loss_context(self):
        return loss_parallel() if self.vocab_parallel else contextlib.nullcontext()

    def train_step(self, samples, raise_oom=False):
        """Runs fairseq's train step under ``loss_parallel`` when the LM head is vocab parallel, so the
        criterion's cross entropy (forward and backward) works on logits sharded over the vocabulary.

        With pipeline parallel, the task's step (forward of the criterion, then ``loss.backward()``) is
        replaced, for the duration of fairseq's step, by the pipeline schedule's forward and backward of
        the batch (:meth:`_pipeline_train_step`); fairseq's accumulation over ``--update-freq``, its sums
        over the dp group, gradient scaling, clipping and optimizer step run as usual around it.
        """
        update = self.get_num_updates() + 1
        if self._profiler is not None:
            self._profiler.before_update(update)
        self._update_samples = samples
        with self._loss_context(), self._pipeline_steps(), self._timed_steps(), self._checking_previous_norm():
            try:  # fault handling (out_of_memory.py): out of memory stops the run unless skipping is allowed
                result = super().train_step(samples, raise_oom or not skipping_allowed())
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                raise out_of_memory_error(update, self.device) from err
            skipped = self._skipped_batches.end_update(update)
            if self._speed_log is not None:
                self._speed_log.end_update(*((0, 0) if skipped else (batch_tokens(samples), trained_tokens(samples))))
        self._update_samples = None
        if self._profiler is not None:
            self._profiler.after_update(update)
        if 0 < self.cfg.optimization.max_update <= self.get_num_updates():
            self._check_previous_norm()  # the last update: no later one will
        return result

    def _log_oom(self, exc):
        """fairseq's report of an out-of-memory error, also noted as a skipped batch (out_of_memory.py)."""
        self._skipped_batches.saw_out_of_memory()
        super()._log_oom(exc)

    def _timed_steps(self):
        """With ``--speed-log``: the task's forward/backward and optimizer steps, timed as compute."""
        if self._speed_log is None:
            return contextlib.nullcontext()
        return _wrapped_task_steps(self.task, {name: self._speed_log.timed for name in ("train_step", "optimizer_step")})

    def _checking_previous_norm(self):
        """On GPUs: the task's train step, then the check of the previous update's gradient norm
        (:meth:`_check_previous_norm`): this update's forward and backward are queued by then, so the
        device is not left idle while the host waits for that norm."""
        if not self.cuda:
            return contextlib.nullcontext()

        def checking(step):
            def train_step(*args, **kwargs):
                result = step(*args, **kwargs)
                self._check_previous_norm(fairseq_saves_crash=True)  # as for any error of the task's step
                return result
            return train_step

        return _wrapped_task_steps(self.task, {"train_step": checking})

    def _prepare_sample(self, sample, is_dummy=False):
        """fairseq's, with the batch pinned first on GPUs: its copy to the device then waits for nothing."""
        if self.cuda and sample and sample != "DUMMY":
            sample = pinned(sample)
        return super()._prepare_sample(sample, is_dummy)

    def valid_step(self, sample, raise_oom=False):
        """fairseq's valid step, under ``loss_parallel`` like :meth:`train_step`, and through the pipeline
        (forward only) with pipeline parallel; after the check of the last update's gradient norm."""
        self._check_previous_norm()
        with self._loss_context(), self._pipeline_steps():
            return super().valid_step(sample, raise_oom)

    @contextlib.contextmanager
    def _pipeline_steps(self):
        if self.pipeline is None:
            yield
            return
        self.task.train_step, self.task.valid_step = self._pipeline_train_step, self._pipeline_valid_step
        try:
            yield
        finally:
            del self.task.train_step, self.task.valid_step  # the task's own methods again

    def _pipeline_train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **_):
        """The task's train step (``hf_finetune``: criterion forward, then backward) through the pipeline.

        Returns what the criterion returns (summed token loss, trained tokens, logging output), the same
        on every rank of the scale unit; the loss is already backpropagated (times 0 for fairseq's dummy batch).
        """
        model.train()
        model.set_num_updates(update_num)
        return self._pipeline_forward(sample, train=True, loss_scale=0.0 if ignore_grad else 1.0)

    def _pipeline_valid_step(self, sample, model, criterion, **_):
        model.eval()
        return self._pipeline_forward(sample, train=False)

    def _pipeline_forward(self, sample, train: bool, loss_scale: float = 1.0):
        net_input = sample["net_input"]
        with autocast(getattr(self.cfg.task, "precision", "fp32"), self.device):
            loss = self.pipeline.run(net_input["input_ids"], net_input.get("attention_mask"), sample["target"],
                                     train=train, loss_scale=loss_scale)
        return loss, sample["ntokens"], logging_output(loss, sample, sample["ntokens"], nll_loss=loss.data)

    def _aggregate_logging_outputs(self, logging_outputs, *extra_stats_to_sum, ignore=False):
        """Logged values that are DTensors (a vocab-parallel loss, replicated over tp) become plain tensors
        before fairseq sums them over the dp group."""
        return super()._aggregate_logging_outputs(_plain(logging_outputs), *extra_stats_to_sum, ignore=ignore)

    def _reduce_and_log_stats(self, logging_outputs, sample_size, grad_norm=None):
        """Replaces fairseq's: the same meters (gnorm, clip, ups, the criterion's), logged with the values
        where they are (on GPUs, on the device: no wait), and a logging output that reads them on first
        access (:class:`LoggedValues`) instead of fairseq's dict of floats read at once. fairseq calls it
        only with a finite norm, or the stand-in of one not yet checked (:meth:`clip_grad_norm`)."""
        standin, norm = self._norm_standin
        self._norm_standin = (None, None)
        if grad_norm is not None:
            grad_norm = local_tensor(norm if grad_norm is standin else grad_norm)
            metrics.log_speed("ups", 1.0, priority=100, round=2)
            metrics.log_scalar("gnorm", grad_norm, priority=400, round=3)
            if self.cfg.optimization.clip_norm > 0:
                clipped = torch.as_tensor(grad_norm) > self.cfg.optimization.clip_norm
                metrics.log_scalar("clip", clipped.float() * 100, priority=500, round=1)
        with metrics.aggregate() as aggregator:
            if logging_outputs is not None:
                self.task.reduce_metrics(_plain(logging_outputs), self.get_criterion())
            if "loss" not in aggregator:
                metrics.log_scalar("loss", -1)  # as fairseq does for a criterion that logs no loss
        return LoggedValues(aggregator, sample_size)

    def lr_step(self, epoch, val_loss=None):
        """fairseq's end-of-epoch LR step, after the check of the epoch's last gradient norm."""
        self._check_previous_norm()
        return super().lr_step(epoch, val_loss)

    @property
    def should_save_checkpoint_on_current_rank(self) -> bool:
        """Replaces "every rank of dp rank 0 writes" (all tp ranks of the first unit, racing on one file):
        only the first rank of the mesh writes; the others of its unit join the gathers (next property)."""
        if self.mesh is None:
            return super().should_save_checkpoint_on_current_rank
        return self.data_parallel_rank == 0 and self.mesh.get_local_rank(TP) == 0 \
            and self.mesh.get_local_rank(PP) == 0

    @property
    def always_call_state_dict_during_save_checkpoint(self) -> bool:
        """The ranks of the first scale unit build the state dict (its gathers are collective over tp);
        with sharded checkpoints nobody needs to (the shards are written before, by every rank)."""
        if self.mesh is None or self.checkpoint_format == "dcp":
            return super().always_call_state_dict_during_save_checkpoint
        return self.data_parallel_rank == 0

    @property
    def writes_shards(self) -> bool:
        """Whether checkpoints are sharded: :func:`save_checkpoint_with_shards` then calls :meth:`write_shards`."""
        return self.checkpoint_format == "dcp"

    def write_shards(self, save_dir: str) -> None:
        """Every rank writes its shards of the model and optimizer into a new DCP folder in ``save_dir``
        (collective); the checkpoint files fairseq writes next (:meth:`state_dict`) name that folder."""
        state = model_entries(self._model)
        if not self.cfg.checkpoint.no_save_optimizer_state:
            state.update(optimizer_entries(self.optimizer.optimizer, self._optimizer_params()))
        self._shards_folder = write_shards(save_dir, state, self.get_num_updates())
        if self.should_save_checkpoint_on_current_rank:
            logger.info(f"model and optimizer shards written to {os.path.join(save_dir, self._shards_folder)}")

    def checkpoint_saved(self, save_dir: str) -> None:
        """After fairseq's save (files written, copied, old ones deleted): forget the folder just written and
        delete the shards folders no checkpoint file names any more."""
        self._shards_folder = None
        if self.should_save_checkpoint_on_current_rank:
            for name in remove_unreferenced_shards(save_dir):
                logger.info(f"removed {os.path.join(save_dir, name)} (no checkpoint file names it)")

    def consolidate_optimizer(self):
        """Replaces fairseq's gather of ZeRO-1's optimizer states on the first rank before a save: a sharded
        checkpoint writes them where they are."""
        if self.checkpoint_format == "dcp":
            return
        super().consolidate_optimizer()

    def state_dict(self):
        """Replaces fairseq's checkpoint content for a sharded checkpoint: fairseq's entries (cfg, optimizer
        history with the LR scheduler, task state, metrics, training time) without the model and optimizer
        tensors, which are in the folder :meth:`write_shards` wrote; ``dcp`` names it."""
        if self._shards_folder is None:
            return super().state_dict()
        optimizer = None
        if not self.cfg.checkpoint.no_save_optimizer_state:
            optimizer = optimizer_record(self.optimizer, self._full_param_names)
        return {
            "args": None,
            "cfg": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)
            if OmegaConf.is_config(self.cfg) else self.cfg,
            "criterion": self.criterion.state_dict() if utils.has_parameters(self.criterion) else None,
            "optimizer_history": (self._optim_history or []) + [{
                "criterion_name": self.get_criterion().__class__.__name__,
                "optimizer_name": self.optimizer.__class__.__name__,
                "lr_scheduler_state": self.lr_scheduler.state_dict(),
                "num_updates": self.get_num_updates(),
            }],
            "task_state": self.task.state_dict() if self.task is not None else {},
            "extra_state": {"metrics": metrics.state_dict(),
                            "previous_training_time": self.cumulative_training_time()},
            SHARDS_KEY: shards_record(self._shards_folder, optimizer),
        }

    def load_checkpoint(self, filename, *args, **kwargs):
        """Replaces fairseq's read of a whole checkpoint by the first rank of each dp group, for a sharded
        checkpoint under a plan on a mesh: that rank reads only the small file, then the model and the
        optimizer read each rank's shards from its folder (``dcp.load`` reshards them to this plan).
        Without a mesh, a sharded checkpoint is read into full tensors like a full one."""
        if self.mesh is None:
            extra_state = super().load_checkpoint(filename, *args, **kwargs)
        else:
            with shards_left_on_disk():
                extra_state = super().load_checkpoint(filename, *args, **kwargs)
        if extra_state is not None:  # fault handling (finished_run.py): a finished run trains nothing
            stop_if_complete(self.get_num_updates(), self.cfg.optimization.max_update, filename)
        return extra_state

    def save_checkpoint(self, filename, extra_state):
        """Replaces fairseq's direct write of ``filename``: write a temporary file, then rename it into place.

        A run killed while saving leaves the previous ``filename`` intact, so it can resume from it. The
        last update's gradient norm is checked first: a checkpoint never holds an update that failed.
        """
        self._check_previous_norm()
        if not self.should_save_checkpoint_on_current_rank:
            return None
        tmp = _temporary_name(filename)
        try:
            super().save_checkpoint(tmp, extra_state)
            os.replace(tmp, filename)
        finally:
            for leftover in (tmp, tmp + ".tmp"):  # fairseq's own save writes to "<name>.tmp" first
                if os.path.exists(leftover):
                    os.remove(leftover)
        return os.path.abspath(filename)


def to_global_indices(state: dict, global_index) -> dict:
    """An optimizer state_dict of one pipeline rank, keyed by the single-process parameter indices."""
    return {"state": {global_index[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [global_index[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def merge_stage_optimizer_states(parts) -> dict:
    """The single-process optimizer state_dict from every pipeline rank's (:func:`to_global_indices`)."""
    state = {index: value for part in parts for index, value in part["state"].items()}
    groups = [{**group, "params": sorted(i for part in parts for i in part["param_groups"][g]["params"])}
              for g, group in enumerate(parts[0]["param_groups"])]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def to_local_indices(state: dict, global_index) -> dict:
    """The inverse of the gather: this rank's entries of a single-process optimizer state_dict."""
    local_of = {g: i for i, g in enumerate(global_index)}
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [local_of[g] for g in group["params"] if g in local_of]})
    return {"state": {local_of[g]: value for g, value in state["state"].items() if g in local_of},
            "param_groups": groups}


def _plain(logging_outputs):
    return [{key: local_tensor(value) if torch.is_tensor(value) else value for key, value in log.items()}
            for log in logging_outputs]


_fairseq_copy = PathManager.copy


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False):
    """Replaces fairseq's in-place copy of a checkpoint to its other names (checkpoint_last.pt, _best, ...).

    Local destinations get a copy under a temporary name renamed into place; remote ones keep fairseq's copy.
    The copy of a sharded checkpoint's small file names the same shards folder: the folder is shared, and
    removed once no file names it (:func:`save_checkpoint_with_shards`).
    """
    if PathManager.path_requires_pathmanager(dst_path):
        return _fairseq_copy(src_path, dst_path, overwrite)
    tmp = _temporary_name(dst_path)
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst_path


_fairseq_save_checkpoint = checkpoint_utils.save_checkpoint


def save_checkpoint_with_shards(cfg, trainer, epoch_itr, val_loss):
    """Replaces fairseq's checkpoint save (its ``checkpoint_utils.save_checkpoint``) for sharded checkpoints.

    fairseq's save writes on the first rank only. With sharded checkpoints every rank first writes its
    shards into a new DCP folder (collective); then fairseq's save runs as usual: its files under its
    names (small, naming that folder), the copies to its other names and the deletion of old ones
    (``--keep-*``). Last, in either format, the shards folders no file names any more are deleted.
    """
    try:  # fault handling (checkpoint_faults.py): a failed save is one message, earlier checkpoints intact
        if not cfg.no_save and getattr(trainer, "writes_shards", False):
            trainer.write_shards(cfg.save_dir)
        result = _fairseq_save_checkpoint(cfg, trainer, epoch_itr, val_loss)
    except OSError as err:
        raise failed_save(cfg.save_dir, err) from err
    if not cfg.no_save and hasattr(trainer, "checkpoint_saved"):
        trainer.checkpoint_saved(cfg.save_dir)  # also after a full save, which may replace a sharded one
    return result


_fairseq_progress_bar = progress_bar.progress_bar


def progress_bar_once_per_log_file(iterator, *args, log_file=None, **kwargs):
    """Replaces fairseq's progress_bar, which adds a new handler for ``--log-file`` at every epoch and
    validation, so each line was written to the log file once more per epoch. The handler is added once."""
    if log_file is not None and any(getattr(h, "baseFilename", None) == os.path.abspath(log_file)
                                    for h in progress_bar.logger.handlers):
        log_file = None
    return _fairseq_progress_bar(iterator, *args, log_file=log_file, **kwargs)


_fairseq_infer_init_method = distributed_utils.infer_init_method
TORCHRUN_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")


def infer_init_method(cfg, force_distributed=False):
    """Replaces fairseq's launch detection for torchrun on hosts without GPUs.

    fairseq takes the world size from ``--distributed-world-size`` (default: the CUDA device count, so
    1 on a CPU host, which makes every torchrun worker train alone) and the device from ``rank %
    cuda.device_count()`` (a division by zero on a CPU host). Under torchrun both come from the
    environment here: world size, rank, and the local rank as device.
    """
    if (cfg.distributed_init_method is None and all(k in os.environ for k in TORCHRUN_VARIABLES)
            and int(os.environ["WORLD_SIZE"]) > 1):
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = int(os.environ["LOCAL_RANK"]) if torch.cuda.is_available() else 0
        cfg.distributed_no_spawn = True
        return
    _fairseq_infer_init_method(cfg, force_distributed)


def broadcast_object_slow(obj, src_rank, group, dist_device):
    """Replaces fairseq's broadcast of a loaded checkpoint from data-parallel rank 0 to the others, which
    round-trips it through ``torch.load`` and fails on torch >= 2.6 (``weights_only`` refuses fairseq's
    config objects). The object comes from a rank of this same job, so torch's pickle-based
    ``broadcast_object_list`` carries it; checkpoint files themselves are still read by fairseq's loader."""
    objects = [obj if dist.get_rank(group) == src_rank else None]
    dist.broadcast_object_list(objects, group_src=src_rank, group=group, device=dist_device)
    return objects[0]


def install() -> None:
    """Make ``fairseq-train`` build :class:`CubeTrainer`, save and read sharded checkpoints, copy checkpoints
    atomically, log once and launch under torchrun on CPU hosts too (idempotent)."""
    import fairseq_cli.train

    fairseq_cli.train.Trainer = CubeTrainer
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == "fairseq_cli.train":
        main.Trainer = CubeTrainer  # launched as `python -m fairseq_cli.train`: that module runs as __main__
    PathManager.copy = staticmethod(atomic_copy)
    checkpoint_utils.save_checkpoint = save_checkpoint_with_shards
    checkpoint_utils.load_checkpoint_to_cpu = read_checkpoint
    progress_bar.progress_bar = progress_bar_once_per_log_file
    distributed_utils.infer_init_method = infer_init_method
    distributed_utils._broadcast_object_slow = broadcast_object_slow
