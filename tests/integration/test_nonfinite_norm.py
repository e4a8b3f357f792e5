"""A gradient norm read after its update (GPUs, one data-parallel replica: the step was launched before the
norm was known) that is not finite stops training with fairseq's error at the next check: crash.pt is
saved, the failed update's batches run again under NanDetector, nothing else is written. On the CPU the
norm is read at once, so these tests leave such a norm pending by hand; tests/gpu runs the real path."""

import pytest
import torch

from tests.helpers import build_trainer


class NonFiniteNorm:
    """Stands for the host copy of a gradient norm that came out NaN."""

    def get(self):
        return torch.tensor(float("nan"))


def pending_nonfinite_norm(trainer, samples):
    trainer._unchecked_norm = (NonFiniteNorm(), samples)
    rerun = []
    task_train_step = trainer.task.train_step

    def recording_train_step(sample, *args, **kwargs):
        rerun.append(sample["net_input"]["input_ids"].clone())
        return task_train_step(sample, *args, **kwargs)

    trainer.task.train_step = recording_train_step
    return rerun


def test_a_checkpoint_save_raises_first_and_writes_only_crash_pt(tmp_path):
    trainer, batches = build_trainer(tmp_path, cpu=True)
    samples = [next(batches)]
    trainer.train_step(samples)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    rerun = pending_nonfinite_norm(trainer, samples)
    with pytest.raises(FloatingPointError, match="gradients are Nan/Inf"):
        trainer.save_checkpoint(str(tmp_path / "checkpoint_last.pt"), {})
    assert not (tmp_path / "checkpoint_last.pt").exists()
    assert (tmp_path / "crash.pt").is_file()
    assert len(rerun) == 1 and torch.equal(rerun[0], samples[0]["net_input"]["input_ids"])  # under NanDetector
    for before, p in zip(weights, trainer.model.parameters()):
        assert torch.equal(before, p.detach())


def test_the_last_update_checks_the_norm_before_training_ends(tmp_path):
    trainer, batches = build_trainer(tmp_path, cpu=True, max_update=2)
    first = [next(batches)]
    trainer.train_step(first)
    pending_nonfinite_norm(trainer, first)
    with pytest.raises(FloatingPointError, match="gradients are Nan/Inf"):
        trainer.train_step([next(batches)])


def test_a_finite_norm_lets_training_go_on(tmp_path):
    trainer, batches = build_trainer(tmp_path, cpu=True)
    samples = [next(batches)]
    trainer.train_step(samples)
    trainer._unchecked_norm = (type("FiniteNorm", (), {"get": lambda self: torch.tensor(1.0)})(), samples)
    trainer.consolidate_optimizer()  # as fairseq's checkpoint_utils does before a save
    trainer.save_checkpoint(str(tmp_path / "checkpoint_last.pt"), {})
    assert (tmp_path / "checkpoint_last.pt").is_file() and not (tmp_path / "crash.pt").exists()
    assert trainer._unchecked_norm is None
