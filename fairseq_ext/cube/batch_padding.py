"""Causal LM batches padded at the end to a length the run needs: what is padded trains nothing.

- Compiled decoder blocks (COMPILE=1) see batch lengths rounded up to a multiple of ``LENGTH_BUCKET`` (at most
  SEQUENCE_LENGTH): the layers compile once for the first length and once more with the length symbolic
  (torch.compile's automatic dynamic shapes), and the caching allocator, the kernels' tiles and the cost
  model see few lengths instead of one per batch. Packed rows (one padding-free row of documents) keep theirs.
- Compiled decoder blocks under tensor parallel run one static shape (SEQUENCE_LENGTH): torch.compile's
  dynamic shapes break in the backward of DTensor projections (an endless recursion over symbolic sizes),
  and without them every new batch length would compile the blocks again.
- Sequence parallel splits the tokens of a batch over the tensor-parallel ranks: tp must divide the length.

Pad tokens come after every real token of their row, so under the causal mask no real token sees them and the
batch needs no attention mask (``data/layouts.py``); their targets are ignored, so the loss, the gradients and
``ntokens`` are those of the batch as it came. Packed rows' pad tokens each start a document of their own
(position 0).
"""

import math
from dataclasses import dataclass
from typing import Dict

import torch

from ..data.layouts import IGNORE_INDEX
from .plan import Plan

LENGTH_BUCKET = 64  # compiled layers see batch lengths rounded up to a multiple of this


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


@dataclass(frozen=True)
class LengthRule:
    """The length a causal LM batch of a run is padded to: the one rule of the runtime and the cost model."""

    tp: int = 1
    sequence_length: int = 0  # SEQUENCE_LENGTH (0: unknown)
    compiled: bool = False  # COMPILE=1
    sequence_parallel: bool = False
    causal_lm: bool = True  # batches of other heads are padded only for tensor-parallel blocks

    @classmethod
    def of(
        cls, plan: Plan, sequence_length: int, compiled: bool, sequence_parallel: bool, causal_lm: bool = True
    ) -> "LengthRule":
        """The rule of a run under ``plan`` (SEQUENCE_LENGTH, COMPILE=1, SEQUENCE_PARALLEL=1, the head)."""
        return cls(plan.tp, sequence_length, compiled, sequence_parallel and plan.tp > 1, causal_lm)

    def __call__(self, length: int, packed: bool = False) -> int:
        """The padded length of a batch ``length`` tokens long (``packed``: one padding-free row of documents)."""
        if self.tp > 1:
            multiple = (self.sequence_length or 1) if self.compiled else 1
            if self.sequence_parallel:
                multiple = multiple * self.tp // math.gcd(multiple, self.tp)
            return _round_up(length, multiple)
        if self.compiled and self.causal_lm and not packed:
            target = _round_up(length, LENGTH_BUCKET)
            return self.sequence_length if length <= self.sequence_length < target else target
        return length


def pad_batch(sample: Dict, rule: LengthRule, pad_id: int) -> Dict:
    """``sample`` (a causal LM batch: ``net_input`` with ``input_ids``, ``target`` of the same shape) padded at
    the end to ``rule``'s length: pad ids, position 0 (packed rows), a zero attention mask where the batch has
    one, ignored targets."""
    if not sample or "net_input" not in sample:
        return sample
    net_input = dict(sample["net_input"])
    ids = net_input["input_ids"]
    extra = rule(ids.size(1), packed="position_ids" in net_input) - ids.size(1)
    if extra <= 0:
        return sample
    fills = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0}
    for name, fill in fills.items():
        if name in net_input:
            net_input[name] = _pad(net_input[name], extra, fill)
    return {**sample, "net_input": net_input, "target": _pad(sample["target"], extra, IGNORE_INDEX)}


def _pad(tensor: torch.Tensor, extra: int, fill: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_full((tensor.size(0), extra), fill)], dim=1)
