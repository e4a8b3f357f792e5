"""The one seam into fairseq's training loop: a Trainer subclass, installed from ``--user-dir`` import.

Each override says which fairseq behaviour it replaces. No other module of fairseq_ext patches fairseq.

A plan of several processes runs on a DeviceMesh (``runtime/mesh.py``): the model is split with DTensor
(tensor parallel) and sharded over the scale units with FSDP2 at the plan's ZeRO level
(``runtime/fsdp.py``) before the optimizer exists; fairseq's data-parallel rank, size and group become
the mesh's dp axis (all ranks of a scale unit read the same batch; logged sums run over dp only), FSDP2
reduces the gradients in the backward instead of DDP, and the optimizer steps each rank's local shards.
fairseq's DDP path (ZeRO-1 by torch's ZeroRedundancyOptimizer) stays for data parallel of models that
are not Hugging Face ones and under fairseq's own --fp16/--bf16/--amp (``plan_checks.runs_on_fairseq_ddp``).

A pipeline-parallel plan (pp > 1) also cuts the model to each rank's stages (``runtime/pipeline.py``);
the pipeline schedule runs forward and backward of each batch in place of the task's train and valid
steps, the last stage's loss is broadcast to the other stages (identical logging outputs on every rank),
the gradient norm sums over the stages.

The trainer's parts live beside it: the plan applied and refused settings (``plan_checks.py``), the
optimizer's sharded view (``sharded_optimizer.py``), the model's (``parallel_model.py``), checkpoint
writing and reading (``checkpoint_saving.py``) and fixes of fairseq's own bugs (``fairseq_fixes.py``);
:func:`install` puts every replacement of a fairseq function in place.
"""

import contextlib
import logging
import os
import sys

import torch
from fairseq import checkpoint_utils
from fairseq import trainer as fairseq_trainer
from fairseq.distributed import ModuleProxyWrapper
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager
from fairseq.logging import metrics, progress_bar
from fairseq.nan_detector import NanDetector
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from ..criterions.base import logging_output
from . import memory_snapshot
from .batch_padding import LengthRule, pad_batch
from .checkpoint_saving import CheckpointSaving, atomic_copy, save_checkpoint_with_shards
from .fairseq_fixes import (
    broadcast_in_group,
    broadcast_object_slow,
    distributed_init,
    infer_init_method,
    progress_bar_once_per_log_file,
)
from .host_copies import HostCopy, LoggedValues, pinned
from .micro_batches import split_batch
from .out_of_memory import SkippedBatches, is_out_of_memory, out_of_memory_error, skipping_allowed
from .parallel_model import TensorParallelModel
from .plan_checks import apply_plan
from .runtime.fsdp import accumulation_without_sync
from .runtime.local_shards import local_tensor
from .runtime.mesh import DP, PP
from .runtime.precision import autocast
from .runtime.recompute import state_dict_name
from .sharded_checkpoint import read_checkpoint
from .sharded_optimizer import ShardedOptimizer
from .speed_log import SpeedLog, batch_tokens, trained_tokens
from .step_profile import StepProfiler, parse_updates

logger = logging.getLogger(__name__)


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


class CubeTrainer(CheckpointSaving, ShardedOptimizer, fairseq_trainer.Trainer):
    """fairseq's Trainer running a cube Plan: data parallel (DDP, also on CPU hosts), or tensor parallel
    on a DeviceMesh; ZeRO-1; checkpoints that are never left half-written."""

    def __init__(self, cfg, task, model, criterion, quantizer=None):
        # recording from here on, so that the snapshot also says where the weights were placed
        self._memory_snapshot = memory_snapshot.from_environment(
            os.path.dirname(os.path.abspath(cfg.checkpoint.save_dir)),
            distributed_utils.get_global_rank(),
            torch.cuda.is_available() and not cfg.common.cpu,
        )
        # Names of the single-process model, before a pipeline plan cuts it to this rank's stages.
        self._full_keys = list(model.state_dict().keys())
        self._full_param_names = [state_dict_name(n) for n, p in model.named_parameters() if p.requires_grad]
        # The plan is applied before fairseq's __init__, which reads the data-parallel size and places the model.
        self.plan, self.mesh, self.vocab_parallel, self.pipeline, self.data_parallel_roots = apply_plan(
            cfg, model, criterion
        )
        self.checkpoint_format = self._checkpoint_format(cfg, model)
        self._length_rule = LengthRule.of(
            self.plan,
            getattr(cfg.task, "sequence_length", 0),
            compiled=bool(getattr(cfg.model, "compile_layers", False)),
            sequence_parallel=bool(getattr(cfg.task, "sequence_parallel", False)),
            causal_lm=getattr(getattr(task, "layout", None), "name", "causal_lm") == "causal_lm",
        )
        self._shards = None
        self._shards_folder = None  # the DCP folder written for the checkpoint being saved
        self._speed_log = None
        self._skipped_batches = SkippedBatches()
        self._norm_standin = (None, None)  # (what fairseq got for the gradient norm, the norm to log)
        self._unchecked_norm = None  # (HostCopy of a norm not yet known finite, the batches of its update)
        self._update_samples = None  # the batches of the update being run
        super().__init__(cfg, task, model, criterion, quantizer)
        speed_log = getattr(cfg.task, "speed_log", "")
        self._speed_log = (
            SpeedLog(speed_log, self.device) if speed_log and distributed_utils.get_global_rank() == 0 else None
        )
        self._profiler = self._step_profiler(cfg)

    def _step_profiler(self, cfg):
        """``--profile-updates``: the profiler of this rank, or None."""
        updates = parse_updates(getattr(cfg.task, "profile_updates", ""))
        if updates is None:
            return None
        folder = getattr(cfg.task, "profile_dir", "") or os.path.join(
            os.path.dirname(os.path.abspath(cfg.checkpoint.save_dir)), "profile"
        )
        return StepProfiler(updates, folder, distributed_utils.get_global_rank(), self.cuda)

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
                self._model,
                self._reduce_grads,
                self.mesh.get_group(PP) if self.pipeline else None,
                self._full_keys,
                no_sync=None if self.pipeline else accumulation_without_sync(self.data_parallel_roots, self.plan),
            )
        if self._wrapped_model is None and self.use_distributed_wrapper and self.device.type == "cpu":
            dt = self.cfg.distributed_training
            self._wrapped_model = ModuleProxyWrapper(
                DistributedDataParallel(
                    self._model,
                    process_group=self.data_parallel_process_group,
                    broadcast_buffers=dt.broadcast_buffers,
                    bucket_cap_mb=dt.bucket_cap_mb,
                    find_unused_parameters=dt.find_unused_parameters,
                    gradient_as_bucket_view=dt.gradient_as_bucket_view,
                )
            )
        return super().model

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
        if (
            self.cuda
            and torch.is_tensor(norm)
            and self._grad_norm_buf is None
            and not self.cfg.common.amp
            and skip_on_device
            and skip_on_device(norm)
        ):
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
                self.task.train_step(
                    sample, self.model, self.criterion, self.optimizer, self.get_num_updates(), ignore_grad=False
                )
        raise FloatingPointError("gradients are Nan/Inf")

    def _clip_grad_norm(self, clip_norm):
        if self.mesh is None:
            return super().clip_grad_norm(clip_norm)
        total_norm = self._shards.grad_norm()
        if hasattr(self.optimizer, "clip_by_norm"):
            return self.optimizer.clip_by_norm(total_norm, clip_norm)  # folded into the step
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
        if self.plan.pp == 1 and self.plan.num_microbatches > 1:  # accumulated inside the update
            samples = [part for sample in samples for part in split_batch(sample, self.plan.num_microbatches)]
        self._update_samples = samples
        with (
            self._loss_context(),
            self._pipeline_steps(),
            self._timed_steps(),
            self._stepping_in_backward(),  # inside the norm check: a rerun of the previous update's batches steps nothing
            self._checking_previous_norm(),
        ):
            try:  # fault handling (out_of_memory.py): out of memory stops the run unless skipping is allowed
                result = super().train_step(samples, raise_oom or not skipping_allowed())
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                raise out_of_memory_error(update, self.device) from err
            skipped, skipped_all_ranks = self._skipped_batches.end_update(update)
            if skipping_allowed():
                self._skipped_batches.log(skipped_all_ranks)
            if self._speed_log is not None:
                tokens = (0, 0) if skipped else (batch_tokens(samples), trained_tokens(samples))
                self._speed_log.end_update(*tokens, skipped_batches=skipped if skipping_allowed() else None)
        self._update_samples = None
        if self._profiler is not None:
            self._profiler.after_update(update)
        if self._memory_snapshot is not None:
            self._memory_snapshot.after_update(update)
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
        return _wrapped_task_steps(
            self.task, {name: self._speed_log.timed for name in ("train_step", "optimizer_step")}
        )

    def _stepping_in_backward(self):
        """With the optimizer step inside the backward (``optim/in_backward.py``): the update's task step makes
        the criterion's sample size the factor its backward steps the weights with (fairseq's multiply_grads,
        applied after the backward otherwise)."""
        in_backward = getattr(self.optimizer, "in_backward", None)
        if in_backward is None:
            return contextlib.nullcontext()
        in_backward.start_update()
        return _wrapped_task_steps(self.task, {"train_step": in_backward.arming})

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
        """fairseq's, with the batch padded to the length the plan needs (``batch_padding.py``) and pinned first
        on GPUs: its copy to the device then waits for nothing."""
        if sample and sample != "DUMMY":
            sample = pad_batch(sample, self._length_rule, getattr(self.task, "pad_id", 0))
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
            loss = self.pipeline.run(
                net_input["input_ids"],
                net_input.get("attention_mask"),
                sample["target"],
                train=train,
                loss_scale=loss_scale,
                position_ids=net_input.get("position_ids"),
            )
        return loss, sample["ntokens"], logging_output(loss, sample, sample["ntokens"], nll_loss=loss.data)

    def _aggregate_logging_outputs(self, logging_outputs, *extra_stats_to_sum, ignore=False):
        """Logged values that are DTensors (a vocab-parallel loss, replicated over tp) become plain tensors
        before fairseq sums them over the dp group; the sum of out-of-memory batches is kept (out_of_memory.py)."""
        result = super()._aggregate_logging_outputs(_plain(logging_outputs), *extra_stats_to_sum, ignore=ignore)
        if self._update_samples is not None:  # in train_step: the sums are (sample size, out-of-memory batches, time)
            self._skipped_batches.summed_over_ranks(result[1][1])
        return result

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


def _plain(logging_outputs):
    return [
        {key: local_tensor(value) if torch.is_tensor(value) else value for key, value in log.items()}
        for log in logging_outputs
    ]


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
    distributed_utils.distributed_init = distributed_init
    distributed_utils.broadcast = broadcast_in_group
