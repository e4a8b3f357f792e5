"""Classification quality: sequence accuracy; token accuracy and entity F1 for BIO-tagged words."""

from typing import List, Sequence, Set, Tuple

import torch

from ..data.layouts import IGNORE_INDEX
from .batches import iterate_batches
from .metric import Metric, ratio


@torch.no_grad()
def evaluate_sequence_classification(model, task, split: str) -> List[Metric]:
    """Accuracy of the argmax class over the samples of ``split``."""
    correct = total = 0
    for batch in iterate_batches(model, task, split):
        predicted = model(**batch["net_input"]).argmax(-1)
        correct += int((predicted == batch["target"]).sum())
        total += batch["target"].numel()
    return [ratio("accuracy", correct, total)]


def entity_spans(tags: Sequence[str]) -> Set[Tuple[str, int, int]]:
    """(type, first, last) word spans of BIO tags (``B-X`` starts an entity, ``I-X`` continues one of type X;
    an ``I-X`` after another type starts a new one, as conlleval reads IOB2)."""
    spans, current = set(), None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        if current and (prefix != "I" or kind != current[0]):
            spans.add((current[0], current[1], i - 1))
            current = None
        if prefix == "B" or (prefix == "I" and current is None and kind):
            current = (kind, i)
    return spans


def entity_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """Micro F1 of exactly matching entity spans over all sentences."""
    found = expected = matched = 0
    for gold_tags, predicted_tags in zip(gold, predicted):
        gold_spans, predicted_spans = entity_spans(gold_tags), entity_spans(predicted_tags)
        found, expected = found + len(predicted_spans), expected + len(gold_spans)
        matched += len(gold_spans & predicted_spans)
    if not matched:
        return 0.0
    precision, recall = matched / found, matched / expected
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def evaluate_token_classification(model, task, split: str) -> List[Metric]:
    """Accuracy over labelled words and, for BIO tags, entity F1 over sentences of ``split``."""
    names = task.label_set.names
    correct = total = 0
    gold, predicted = [], []
    for batch in iterate_batches(model, task, split):
        guess = model(**batch["net_input"]).argmax(-1)
        target = batch["target"]
        labelled = target != IGNORE_INDEX
        correct += int(((guess == target) & labelled).sum())
        total += int(labelled.sum())
        for row in range(target.size(0)):
            keep = labelled[row]
            gold.append([names[i] for i in target[row][keep].tolist()])
            predicted.append([names[i] for i in guess[row][keep].tolist()])
    metrics = [ratio("token accuracy", correct, total)]
    if any(name[:2] in ("B-", "I-") for name in names):
        metrics.append(Metric("entity F1", entity_f1(gold, predicted)))
    return metrics
