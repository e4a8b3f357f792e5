"""Global batches: every plan with the same global batch trains on the same samples at each update, and
a checkpoint's position means the same sample under another number of scale units or accumulation."""

import datasets
import numpy as np
import pytest

from fairseq_ext.data.global_batches import GlobalBatchIterator
from fairseq_ext.data.layouts import get_layout
from fairseq_ext.data.tokenized import TokenizedDataset

NUM_SAMPLES, GLOBAL = 44, 8  # 5 full global batches and a short one


def _dataset():
    rows = [[3 + i] * (1 + i % 7) for i in range(NUM_SAMPLES)]
    return TokenizedDataset(
        datasets.Dataset.from_dict({"input_ids": rows, "labels": rows}),
        get_layout("causal_lm"),
        pad_id=0,
        shuffle=False,
    )


def _iterators(units, accumulation, epoch=1):
    dataset = _dataset()
    micro = GLOBAL // (units * accumulation)
    batches = dataset.batch_by_size(dataset.ordered_indices(), max_sentences=GLOBAL)
    return [
        GlobalBatchIterator(
            units=units,
            unit=u,
            accumulation=accumulation,
            micro_batch=micro,
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=batches,
            seed=7,
            epoch=epoch,
        )
        for u in range(units)
    ]


def _updates(units, accumulation, epoch=2):
    """Per update, the set of sample indices all units train on."""
    pieces = [it.ordered_batches(epoch, False, shuffle=True) for it in _iterators(units, accumulation)]
    updates = []
    for start in range(0, len(pieces[0]), accumulation):
        updates.append(sorted(i for unit in pieces for piece in unit[start : start + accumulation] for i in piece))
    return updates


@pytest.mark.parametrize("units, accumulation", [(2, 1), (4, 1), (1, 4), (2, 2), (4, 2)])
def test_every_plan_trains_on_the_same_samples_at_each_update(units, accumulation):
    expected = _updates(1, 1)
    assert _updates(units, accumulation) == expected
    assert sorted(i for update in expected for i in update) == list(range(NUM_SAMPLES))
    assert _updates(1, 1, epoch=3) != expected  # the global batches are shuffled per epoch


def test_position_resumes_at_the_same_global_batch_under_another_plan():
    one = _iterators(1, 1)[0]
    itr = one.next_epoch_itr(shuffle=True)
    for _ in range(3):
        next(itr)
    state = one.state_dict()
    assert state["global_batches_in_epoch"] == 3
    resumed = _iterators(4, 2)
    expected_next = _updates(1, 1, epoch=1)[3]
    got = []
    for unit in resumed:
        unit.load_state_dict(state)
        unit_itr = unit.next_epoch_itr(shuffle=True)
        got += [i for _ in range(2) for i in next(unit_itr)["id"].tolist()]
    assert sorted(got) == expected_next


def test_dummy_batch_is_one_micro_batch():
    first = _iterators(4, 1)[0].first_batch
    assert first["nsentences"] == GLOBAL // 4
    assert np.all(first["id"].numpy() >= 0)
