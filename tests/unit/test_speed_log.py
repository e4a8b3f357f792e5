"""The speed log: one record per update, compute inside step, peaks kept across fairseq's resets."""

import json
import time

import torch

from fairseq_ext.cube.speed_log import SpeedLog, batch_tokens


def test_one_record_per_update_with_compute_inside_the_step(tmp_path):
    log = SpeedLog(str(tmp_path / "speed.jsonl"), torch.device("cpu"))
    forward, step = log.timed(lambda: time.sleep(0.02)), log.timed(lambda: time.sleep(0.01))
    for update in range(3):
        forward()
        step()
        time.sleep(0.03)  # bookkeeping between updates
        log.end_update(tokens=100 + update)
    log.end_update(tokens=5)  # an update that timed nothing writes nothing
    log.flush()
    records = [json.loads(line) for line in (tmp_path / "speed.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records] == [1, 2, 3]
    assert [r["tokens"] for r in records] == [100, 101, 102]
    for record in records:
        assert record["compute_s"] >= 0.03
    for record in records[1:]:  # from the previous update's end: its bookkeeping, then this compute
        assert record["step_s"] >= record["compute_s"] + 0.03


def test_batch_tokens_counts_padding_and_skips_dummy_batches():
    sample = {"net_input": {"input_ids": torch.zeros(4, 7, dtype=torch.long)}}
    assert batch_tokens([sample, {}, sample]) == 56


def test_trained_tokens_are_recorded_beside_padded_tokens(tmp_path):
    from fairseq_ext.cube.speed_log import trained_tokens

    log = SpeedLog(str(tmp_path / "speed.jsonl"), torch.device("cpu"))
    samples = [{"net_input": {"input_ids": torch.zeros(2, 5, dtype=torch.long)}, "ntokens": 7}, {}]
    log.timed(lambda: None)()
    log.end_update(batch_tokens(samples), trained_tokens(samples))
    log.flush()
    record = json.loads((tmp_path / "speed.jsonl").read_text())
    assert (record["tokens"], record["trained_tokens"]) == (10, 7)
