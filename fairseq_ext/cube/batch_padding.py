"""Causal LM batches padded at the end to a length a plan needs: what is padded is masked out and trains nothing.

- Compiled decoder blocks under tensor parallel run one static shape (SEQUENCE_LENGTH): torch.compile's
  dynamic shapes break in the backward of DTensor projections (an endless recursion over symbolic sizes),
  and without them every new batch length would compile the blocks again.
- Sequence parallel splits the tokens of a batch over the tensor-parallel ranks: tp must divide the length.

Pad tokens come after every real token of their row, so under the causal mask no real token sees them; their
targets are ignored, so the loss, the gradients and ``ntokens`` are those of the batch as it came.
"""

import math
from typing import Dict

import torch

from ..data.layouts import IGNORE_INDEX
from .plan import Plan


def length_multiple(plan: Plan, sequence_length: int, compiled: bool, sequence_parallel: bool) -> int:
    """The multiple a batch's length is padded to under ``plan`` (1: batches stay as they come)."""
    multiple = 1
    if plan.tp > 1 and compiled:
        multiple = sequence_length
    if plan.tp > 1 and sequence_parallel:
        multiple = multiple * plan.tp // math.gcd(multiple, plan.tp)
    return multiple


def pad_batch(sample: Dict, multiple: int, pad_id: int) -> Dict:
    """``sample`` (a causal LM batch: ``net_input`` with ``input_ids``, ``target`` of the same shape) with its
    length padded to a multiple of ``multiple``: pad ids, a zero attention mask (made when the batch had
    none), position 0 (packed rows: each pad token a sequence of its own) and ignored targets."""
    if multiple <= 1 or not sample or "net_input" not in sample:
        return sample
    net_input = dict(sample["net_input"])
    ids = net_input["input_ids"]
    extra = -ids.size(1) % multiple
    if not extra:
        return sample
    if "position_ids" not in net_input and "attention_mask" not in net_input:
        net_input["attention_mask"] = torch.ones_like(ids)
    fills = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0}
    for name, fill in fills.items():
        if name in net_input:
            net_input[name] = _pad(net_input[name], extra, fill)
    return {**sample, "net_input": net_input, "target": _pad(sample["target"], extra, IGNORE_INDEX)}


def _pad(tensor: torch.Tensor, extra: int, fill: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_full((tensor.size(0), extra), fill)], dim=1)
