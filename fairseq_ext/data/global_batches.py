"""Training batches made as global batches, so that the data order does not depend on the plan.

fairseq makes batches of ``--batch-size`` samples, shuffles that list and deals it out to the
data-parallel ranks; ``--update-freq`` then groups each rank's consecutive batches. Which samples
meet in one update therefore depends on the number of scale units and on GRADIENT_ACCU_NUM, and a
checkpoint's position (batches consumed per rank) means something else under another plan.

Here the batches are *global*: BATCH_SIZE x scale units x GRADIENT_ACCU_NUM consecutive samples of
the length-sorted order, shuffled per epoch as whole batches. Each update consumes one global batch;
scale unit ``u`` takes micro-batch ``a * units + u`` of it for accumulation step ``a``. One process
with BATCH_SIZE 8, four units of 2, or one unit accumulating 4 batches of 2 train on the same samples
at every update, and a checkpoint records how many global batches the epoch has consumed, so it
resumes at the same sample under any plan with the same global batch.

With MAX_TOKENS (fairseq's ``--max-tokens``) the micro-batches are cut first: consecutive samples of the
length-sorted order while the longest times their count stays within MAX_TOKENS, the same cut under every
plan; a global batch is units x GRADIENT_ACCU_NUM consecutive micro-batches. Plans with the same MAX_TOKENS
and the same units x GRADIENT_ACCU_NUM (two scale units, or one accumulating two micro-batches) train the
same samples at every update and resume each other's checkpoints at the same sample.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
from fairseq.data import data_utils, iterators


def token_budget_batches(sizes: Sequence[int], max_tokens: int, max_samples: Optional[int] = None) -> List[List[int]]:
    """Positions of ``sizes`` (in their order) cut into consecutive batches of at most ``max_tokens`` padded
    tokens each (the longest sample times the samples, as fairseq's ``--max-tokens`` counts them) and at
    most ``max_samples`` samples."""
    batches: List[List[int]] = []
    longest = 0  # of the batch being filled
    for position, size in enumerate(sizes):
        if size > max_tokens:
            raise ValueError(f"a sample of {size} tokens does not fit MAX_TOKENS {max_tokens}")
        count = len(batches[-1]) + 1 if batches else 0
        if batches and max(longest, size) * count <= max_tokens and count <= (max_samples or count):
            batches[-1].append(position)
            longest = max(longest, size)
        else:
            batches.append([position])
            longest = size
    return batches


def token_budget_global_batches(
    indices: np.ndarray, sizes: np.ndarray, max_tokens: int, micro_batches: int, max_samples: Optional[int] = None
) -> List[Tuple[np.ndarray, ...]]:
    """Global batches of ``micro_batches`` micro-batches each, cut from ``indices`` (in training order, of
    samples ``sizes[index]`` tokens long) by :func:`token_budget_batches` (the epoch's last may hold fewer)."""
    indices = np.asarray(indices, dtype=np.int64)
    sizes = np.asarray(sizes)[indices].tolist()
    cut = [indices[positions] for positions in token_budget_batches(sizes, max_tokens, max_samples)]
    return [tuple(cut[start : start + micro_batches]) for start in range(0, len(cut), micro_batches)]


class GlobalBatchIterator(iterators.EpochBatchIterator):
    """An EpochBatchIterator over ``frozen_batches`` of global batches that yields this scale unit's
    micro-batches of each, in update order (see the module docstring). ``micro_batch``: samples per
    micro-batch; None: each global batch is a tuple of its micro-batches (MAX_TOKENS)."""

    def __init__(self, *, units: int, unit: int, accumulation: int, micro_batch: Optional[int], **kwargs):
        super().__init__(num_shards=1, shard_id=0, **kwargs)
        self.units, self.unit, self.accumulation, self.micro_batch = units, unit, accumulation, micro_batch

    def _my_pieces(self, global_batch) -> List[List[int]]:
        if self.micro_batch is None:
            picks = [step * self.units + self.unit for step in range(self.accumulation)]
            return [list(global_batch[i]) if i < len(global_batch) else [] for i in picks]
        starts = [(step * self.units + self.unit) * self.micro_batch for step in range(self.accumulation)]
        return [list(global_batch[start : start + self.micro_batch]) for start in starts]

    def ordered_batches(self, epoch, fix_batches_to_gpus, shuffle):
        """This unit's micro-batches for ``epoch``: global batches shuffled under ``seed + epoch``, as a
        whole, then cut (a micro-batch of the epoch's short last batch may be empty: fairseq then runs
        its dummy batch without gradient)."""
        batches = list(self.frozen_batches)
        if shuffle:
            with data_utils.numpy_seed(self.seed + epoch):
                np.random.shuffle(batches)
        return [piece for batch in batches for piece in self._my_pieces(batch)]

    def __len__(self) -> int:
        return len(self.frozen_batches) * self.accumulation

    @property
    def first_batch(self):
        """A micro-batch of the first global batch (fairseq's dummy batch is made from it)."""
        first = self.frozen_batches[0]
        first = first[0] if self.micro_batch is None else first[: self.micro_batch]
        return self.collate_fn([self.dataset[i] for i in first])

    def state_dict(self):
        """fairseq's iterator state, plus the position in global batches (the same under every plan)."""
        state = super().state_dict()
        state["global_batches_in_epoch"] = state["iterations_in_epoch"] // self.accumulation
        return state

    def load_state_dict(self, state_dict):
        """Resume at the saved global batch, whatever the saving run's scale units and accumulation were."""
        if "global_batches_in_epoch" in state_dict:
            state_dict = dict(state_dict, iterations_in_epoch=state_dict["global_batches_in_epoch"] * self.accumulation)
        return super().load_state_dict(state_dict)
