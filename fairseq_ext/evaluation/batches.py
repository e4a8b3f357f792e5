"""Batches of a split for evaluation, in file order, on the model's device."""

from typing import Dict, Iterator

import torch
from fairseq import utils


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def iterate_batches(model, task, split: str, batch_size: int = 64) -> Iterator[Dict]:
    """fairseq sample dicts of ``split`` (loaded through the task, as training sees it), in order."""
    if split not in task.datasets:
        task.load_dataset(split)
    dataset = task.dataset(split)
    device = model_device(model)
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collater([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        yield utils.apply_to_sample(lambda t: t.to(device), batch)
