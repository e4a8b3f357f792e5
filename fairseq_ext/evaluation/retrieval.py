"""Sentence-embedding quality: recall@1 of finding each text's pair among all pairs of the split."""

from typing import List

import torch
import torch.nn.functional as F

from ..criterions.contrastive import mean_pool
from .batches import iterate_batches
from .metric import ratio


@torch.no_grad()
def evaluate_retrieval(model, task, split: str) -> List:
    """For each text, is its own pair the nearest (cosine of mean-pooled embeddings) of the split's pairs?"""
    texts, pairs = [], []
    for batch in iterate_batches(model, task, split):
        for inputs, out in ((batch["net_input"], texts), (batch["pair_input"], pairs)):
            out.append(F.normalize(mean_pool(model(**inputs).float(), inputs["attention_mask"]), dim=-1).cpu())
    scores = torch.cat(texts) @ torch.cat(pairs).T
    correct = int((scores.argmax(1) == torch.arange(scores.size(0))).sum())
    return [ratio("recall@1", correct, scores.size(0))]
