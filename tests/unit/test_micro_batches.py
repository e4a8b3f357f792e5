"""Micro-batches without pipeline stages: a batch in parts trains exactly like the whole batch."""

import torch

from fairseq_ext.cube.micro_batches import split_batch
from fairseq_ext.cube.plan import Plan
from fairseq_ext.data.layouts import IGNORE_INDEX
from tests.helpers import build_trainer


def test_parts_keep_every_row_and_count_their_own_tokens():
    target = torch.tensor([[1, IGNORE_INDEX], [2, 3], [IGNORE_INDEX, IGNORE_INDEX]])
    sample = {
        "id": torch.arange(3),
        "nsentences": 3,
        "ntokens": 3,
        "target": target,
        "net_input": {"input_ids": torch.ones(3, 2, dtype=torch.long), "position_ids": torch.zeros(3, 2)},
    }
    parts = split_batch(sample, 2)
    assert [p["nsentences"] for p in parts] == [2, 1] and [p["ntokens"] for p in parts] == [3, 0]
    assert torch.equal(torch.cat([p["target"] for p in parts]), target)
    assert torch.equal(torch.cat([p["net_input"]["position_ids"] for p in parts]), sample["net_input"]["position_ids"])
    assert len(split_batch(sample, 5)) == 3  # never an empty part
    assert split_batch({}, 2) == [{}] and split_batch(sample, 1) == [sample]


def test_a_batch_in_two_parts_trains_like_the_whole_batch(tmp_path, monkeypatch):
    from fairseq_ext.cube import trainer as trainer_module

    counts = []
    monkeypatch.setattr(trainer_module, "split_batch", lambda sample, n: counts.append(n) or split_batch(sample, n))
    weights, losses = [], []
    for parts in (1, 2):
        plan_file = tmp_path / f"plan{parts}.json"
        Plan(plan_ngpus=1, scaling_factor=1, tp=1, pp=1, num_microbatches=parts).save(str(plan_file))
        trainer, batches = build_trainer(tmp_path / f"save{parts}", extra=["--plan-file", str(plan_file)], cpu=True)
        logged = [float(trainer.train_step([next(batches)])["loss"]) for _ in range(2)]
        losses.append(logged)
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert counts == [2, 2]  # the plan of two parts split each batch; the plan of one did not
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for split, whole in zip(*weights):
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
