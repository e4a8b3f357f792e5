"""On a GPU: fairseq's update returns to the host while the device still runs its backward and optimizer
step; a non-finite gradient norm still stops training with fairseq's error.

Runs on the GPU machine (``python -m pytest -q tests/gpu``); without CUDA there is no device to run ahead of.
"""

import math

import pytest
import torch
from fairseq.logging import metrics

from tests.helpers import build_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SLEEP_CYCLES = 2_000_000_000  # about a second of device time, queued behind each optimizer step


# fp32 weights take torch's fused AdamW; bf16-master's and bf16-lean's the Triton kernels (optim/*_step.py)
PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16-master", "bf16-lean"])


@PRECISIONS
def test_update_returns_before_the_device_finishes_its_optimizer_step(tmp_path, precision):
    trainer, batches = build_trainer(tmp_path, extra=["--precision", precision])
    task_step = trainer.task.optimizer_step

    def slow_optimizer_step(*args, **kwargs):
        task_step(*args, **kwargs)
        torch.cuda._sleep(SLEEP_CYCLES)

    trainer.task.optimizer_step = slow_optimizer_step
    for _ in range(2):  # the first update also builds the optimizer state
        torch.cuda.synchronize()
        log = trainer.train_step([next(batches)])
        assert not torch.cuda.current_stream().query(), "train_step waited for the device's optimizer step"
        next_batch = trainer._prepare_sample(next(batches))[0]
        assert next_batch["net_input"]["input_ids"].is_cuda
        assert not torch.cuda.current_stream().query(), "copying the next batch waited for the device"
        # the logged values, read when asked for (a wait for the device then), are real
        assert isinstance(log["loss"], float) and math.isfinite(log["loss"]) and log["loss"] > 0


def test_optimizer_step_is_launched_before_the_backward_ends(tmp_path):
    """fairseq checks the gradient norm is finite before the step (a wait for the whole backward); here the
    step is launched while the device still runs the backward's work."""
    trainer, batches = build_trainer(tmp_path)
    task_train_step, task_optimizer_step = trainer.task.train_step, trainer.task.optimizer_step
    device_busy_at_step = []

    def slow_train_step(*args, **kwargs):
        result = task_train_step(*args, **kwargs)
        torch.cuda._sleep(SLEEP_CYCLES)  # the end of the backward, as the device sees it
        return result

    def recording_optimizer_step(*args, **kwargs):
        device_busy_at_step.append(not torch.cuda.current_stream().query())
        return task_optimizer_step(*args, **kwargs)

    trainer.task.train_step, trainer.task.optimizer_step = slow_train_step, recording_optimizer_step
    for _ in range(3):
        torch.cuda.synchronize()
        trainer.train_step([next(batches)])
    # fairseq empties the CUDA cache after the first update's backward (a device-wide wait): updates 2 and 3
    assert device_busy_at_step[1:] == [True, True], device_busy_at_step


def test_update_returns_before_the_device_finishes_its_backward(tmp_path):
    """Nothing the update logs is read when it ends: the host goes on to the next batch while the device
    still runs this update's backward."""
    trainer, batches = build_trainer(tmp_path)
    task_train_step = trainer.task.train_step

    def slow_train_step(*args, **kwargs):
        result = task_train_step(*args, **kwargs)
        torch.cuda._sleep(SLEEP_CYCLES)  # the end of the backward, as the device sees it
        return result

    trainer.train_step([next(batches)])  # fairseq empties the CUDA cache in the first update (a device-wide wait)
    trainer.task.train_step = slow_train_step
    logs = []
    for _ in range(3):
        torch.cuda.synchronize()
        logs.append(trainer.train_step([next(batches)]))
        assert not torch.cuda.current_stream().query(), "train_step waited for the device's backward"
    for log in logs:  # read on first access: the update's own values
        assert math.isfinite(log["loss"]) and log["loss"] > 0
    assert len({log["loss"] for log in logs}) == 3
    gnorm = metrics.get_smoothed_values("default")["gnorm"]  # fairseq logs it outside the update's output
    assert math.isfinite(gnorm) and gnorm > 0


def nan_gradients(trainer):
    """Makes the task's next train steps leave a NaN in one gradient."""
    task_train_step = trainer.task.train_step

    def nan_train_step(*args, **kwargs):
        result = task_train_step(*args, **kwargs)
        next(p for p in trainer.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return result

    trainer.task.train_step = nan_train_step
    return task_train_step


@PRECISIONS
def test_nonfinite_gradients_raise_fairseqs_error_at_the_next_update_and_leave_the_weights(tmp_path, precision):
    trainer, batches = build_trainer(tmp_path, extra=["--precision", precision])
    trainer.train_step([next(batches)])
    clean_train_step = nan_gradients(trainer)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step([next(batches)])  # its step skipped itself on the device
    trainer.task.train_step = clean_train_step
    with pytest.raises(FloatingPointError, match="gradients are Nan/Inf"):
        trainer.train_step([next(batches)])  # raised once its forward and backward are queued, before its step
    for before, p in zip(weights, trainer.model.parameters()):
        assert torch.equal(before, p.detach())
    assert (tmp_path / "crash.pt").is_file()  # as fairseq saves it


def test_nonfinite_gradients_in_the_last_update_raise_in_it(tmp_path):
    trainer, batches = build_trainer(tmp_path, max_update=2)
    trainer.train_step([next(batches)])
    nan_gradients(trainer)
    with pytest.raises(FloatingPointError, match="gradients are Nan/Inf"):
        trainer.train_step([next(batches)])


def test_a_checkpoint_is_not_written_after_nonfinite_gradients(tmp_path):
    trainer, batches = build_trainer(tmp_path)
    trainer.train_step([next(batches)])
    nan_gradients(trainer)
    trainer.train_step([next(batches)])
    with pytest.raises(FloatingPointError, match="gradients are Nan/Inf"):
        trainer.save_checkpoint(str(tmp_path / "checkpoint_last.pt"), {})
    assert not (tmp_path / "checkpoint_last.pt").exists()
