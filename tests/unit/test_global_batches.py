"""Global batches: every plan with the same global batch trains on the same samples at each update, and
a checkpoint's position means the same sample under another number of scale units or accumulation."""

import datasets
import numpy as np
import pytest

from fairseq_ext.data.global_batches import GlobalBatchIterator, token_budget_batches, token_budget_global_batches
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


def _iterators(units, accumulation, epoch=1, max_tokens=None):
    """One iterator per scale unit: global batches of GLOBAL samples, or of units x accumulation micro-batches
    of at most ``max_tokens`` tokens."""
    dataset = _dataset()
    if max_tokens:
        micro = None
        batches = token_budget_global_batches(
            dataset.ordered_indices(), dataset.sizes, max_tokens, units * accumulation
        )
    else:
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


MAX_TOKENS = 12  # samples of 1-7 tokens: 1 to 12 a micro-batch


def _token_updates(units, accumulation, epoch=2):
    """Per update, the micro-batches (sorted sample indices) all units train on."""
    iterators = _iterators(units, accumulation, max_tokens=MAX_TOKENS)
    pieces = [it.ordered_batches(epoch, False, shuffle=True) for it in iterators]
    updates = []
    for start in range(0, len(pieces[0]), accumulation):
        updates.append(sorted(sorted(piece) for unit in pieces for piece in unit[start : start + accumulation]))
    return updates


@pytest.mark.parametrize("units, accumulation", [(2, 1), (1, 2), (4, 1), (2, 2), (1, 4)])
def test_token_budget_plans_of_one_product_train_the_same_micro_batches_at_each_update(units, accumulation):
    """MAX_TOKENS: the micro-batches are cut the same under every plan, each within the budget (the longest
    sample times the samples), and plans with the same units x accumulation group them into the same updates."""
    expected = _token_updates(units * accumulation, 1)
    assert _token_updates(units, accumulation) == expected
    sizes = _dataset().sizes
    micro = [piece for update in expected for piece in update if piece]
    assert all(max(sizes[piece]) * len(piece) <= MAX_TOKENS for piece in micro)
    assert sorted(i for piece in micro for i in piece) == list(range(NUM_SAMPLES))
    # the budget is filled: no micro-batch could have taken the next sample of the sorted order
    order = _dataset().ordered_indices().tolist()
    for piece in micro:
        last = max(order.index(i) for i in piece)
        if last + 1 < len(order):
            grown = list(piece) + [order[last + 1]]
            assert max(sizes[grown]) * len(grown) > MAX_TOKENS


def test_token_budget_position_resumes_at_the_same_global_batch_under_another_plan():
    two = _iterators(2, 1, max_tokens=MAX_TOKENS)
    itrs = [unit.next_epoch_itr(shuffle=True) for unit in two]
    for itr in itrs:
        for _ in range(3):
            next(itr)
    state = two[0].state_dict()
    assert state["global_batches_in_epoch"] == 3
    resumed = _iterators(1, 2, max_tokens=MAX_TOKENS)[0]
    resumed.load_state_dict(state)
    itr = resumed.next_epoch_itr(shuffle=True)
    got = sorted(sorted(next(itr)["id"].tolist()) for _ in range(2))
    assert got == _token_updates(2, 1, epoch=1)[3]
    assert _iterators(2, 2, max_tokens=MAX_TOKENS)[1].first_batch["nsentences"] >= 1
    assert token_budget_batches([3, 3, 3, 5], 9, max_samples=2) == [[0, 1], [2], [3]]
