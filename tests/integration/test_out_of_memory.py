"""Out of memory (simulated on the CPU: the model's forward raises torch's OutOfMemoryError at a chosen
update) stops the run with one message, or, with FAIRSEQ_EXT_SKIP_OOM_BATCHES=1, skips the batch, counts
it and counts none of its tokens in the speed log."""

import json

import pytest
import torch
from fairseq import trainer as fairseq_trainer
from fairseq.logging import metrics

from fairseq_ext.criterions.lm_loss import perplexity
from fairseq_ext.cube.out_of_memory import SKIP_VARIABLE
from fairseq_ext.errors import UserInputError
from tests.helpers import build_trainer


def out_of_memory_at(trainer, monkeypatch, calls):
    """Make the model's forward raise OutOfMemoryError at the given forward calls (counted from 1)."""
    forward, count = trainer.model.forward, [0]

    def maybe_out_of_memory(*args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "forward", maybe_out_of_memory)


def test_out_of_memory_stops_the_run_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(SKIP_VARIABLE, raising=False)
    trainer, batches = build_trainer(tmp_path, cpu=True)
    trainer.train_step([next(batches)])
    out_of_memory_at(trainer, monkeypatch, {1})
    with pytest.raises(
        UserInputError,
        match=r"out of memory at update 2 \(peak not measured on the CPU\); lower "
        r"BATCH_SIZE .*`bash run.sh compile` .*SKIP_OOM_BATCHES=1",
    ) as raised:
        trainer.train_step([next(batches)])
    assert "\n" not in str(raised.value)


def test_skipped_batches_are_counted_and_train_no_tokens(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(SKIP_VARIABLE, "1")
    speed_log = tmp_path / "speed.jsonl"
    trainer, batches = build_trainer(tmp_path, cpu=True, extra=["--speed-log", str(speed_log)])
    out_of_memory_at(trainer, monkeypatch, {2})
    with metrics.aggregate() as logged:
        for _ in range(3):
            trainer.train_step([next(batches)])
    trainer._speed_log.flush()
    records = [json.loads(line) for line in speed_log.read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3]
    assert [r["skipped_batches"] for r in records] == [0, 1, 0]
    assert records[1]["tokens"] == 0 and records[1]["trained_tokens"] == 0
    assert records[0]["trained_tokens"] > 0 and records[2]["trained_tokens"] > 0
    assert trainer._skipped_batches.count == 1 and trainer.get_num_updates() == 2
    assert "out of memory, batch skipped (SKIP_OOM_BATCHES=1); 1 skipped so far" in caplog.text
    # fairseq's training log: a field of its own; its token count ("wpb") has the two trained batches only
    assert logged.get_smoothed_values()["skipped_batches"] == 1
    assert logged["wpb"].count == 2
    assert perplexity(None) == 0.0 and perplexity(3.0) == 8.0  # the loss of a dropped batch is missing


def test_skipped_batches_are_summed_over_the_data_parallel_ranks(tmp_path, monkeypatch):
    """With several ranks fairseq sums its count of out-of-memory batches over the dp group (stood in for here:
    another rank dropped one); the training log's field is that sum, this rank's speed log its own."""
    monkeypatch.setenv(SKIP_VARIABLE, "1")
    speed_log = tmp_path / "speed.jsonl"
    trainer, batches = build_trainer(tmp_path, cpu=True, extra=["--speed-log", str(speed_log)])
    monkeypatch.setattr(type(trainer), "_sync_stats", lambda self: True)

    def summed(self, logging_outputs, sample_size, ooms, train_time, ignore=False):
        return logging_outputs, (sample_size * 2, ooms + 1, train_time * 2)

    monkeypatch.setattr(fairseq_trainer.Trainer, "_aggregate_logging_outputs", summed)
    with metrics.aggregate() as logged:
        trainer.train_step([next(batches)])
    trainer._speed_log.flush()
    record = json.loads(speed_log.read_text())
    assert record["skipped_batches"] == 0 and record["trained_tokens"] > 0
    assert logged.get_smoothed_values()["skipped_batches"] == 1 and trainer._skipped_batches.count == 0
