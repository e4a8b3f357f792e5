"""What the micro-batches of a run compute, for the cost model: tokens, attention spans, attention kernel.

Rows of exactly SEQUENCE_LENGTH tokens (:func:`full_rows`) are what a profile measures: ``batch_size x seq_len``
tokens a micro-batch, each attending over its row through causal SDPA. Variable-length data is batched
otherwise, and :func:`from_micro_batches` describes what its micro-batches compute:

- packed (PACK_SEQUENCES=1): rows of whole documents, the micro-batch run as one padding-free row through
  the variable-length kernel (``models/document_attention.py``): its tokens are the documents' tokens and
  each token attends inside its document;
- padded: each row one sample, padded at its end to the micro-batch's longest, rounded up as the runtime
  rounds it (``cube/batch_padding.py``: LENGTH_BUCKET under COMPILE=1); the padding is computed, through
  causal SDPA over the padded length (the batch carries no mask: no real token sees the pad tokens after it).

Attention kernels work in tiles of ``ATTENTION_TILE`` queries by as many keys: a causal span of ``L`` tokens
(a document, a full row) computes the ``n (n + 1) / 2`` tiles on and below the diagonal (``n = ceil(L /
ATTENTION_TILE)``).
``work_per_token`` is that tile area per token of the micro-batch; :meth:`BatchLayout.attention_scale` is it
against a full row's, which is what a profile counts. :func:`micro_batches` cuts sample lengths into the micro-batches a run makes of them
(truncation, packing, the length-sorted order, BATCH_SIZE or MAX_TOKENS per micro-batch).
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

# the attention kernels a layout runs: causal rows (full or padded), documents of a padding-free row
CAUSAL, VARLEN = "causal", "varlen"
ATTENTION_TILE = 128  # queries (and keys) of a flash-attention tile


def causal_work(length: int) -> float:
    """Query x key positions a causal attention kernel computes for a span of ``length`` tokens (whole tiles)."""
    n = -(-length // ATTENTION_TILE)
    return ATTENTION_TILE**2 * n * (n + 1) / 2


@dataclass(frozen=True)
class BatchLayout:
    """What one micro-batch of a scale unit computes, on average (step time) and at its largest (memory)."""

    tokens: float  # mean tokens a micro-batch computes (padding included where rows are padded)
    peak_tokens: float  # the largest micro-batch's tokens: what its activations must hold
    work_per_token: float  # the attention kernel's query x key positions per token (see the module docstring)
    kernel: str = CAUSAL  # CAUSAL or VARLEN

    def attention_scale(self, seq_len: int) -> float:
        """The attention work per token against a full causal row of ``seq_len`` (what a profile counts)."""
        return self.work_per_token / (causal_work(seq_len) / seq_len)


def full_rows(batch_size: int, seq_len: int) -> BatchLayout:
    """Micro-batches of ``batch_size`` rows of exactly ``seq_len`` tokens."""
    tokens = batch_size * seq_len
    return BatchLayout(tokens, tokens, causal_work(seq_len) / seq_len, CAUSAL)


def token_budget(max_tokens: int, seq_len: int) -> BatchLayout:
    """Micro-batches of at most ``max_tokens`` tokens (MAX_TOKENS), their lengths unknown: as full as the
    budget, of rows as long as SEQUENCE_LENGTH (the longest spans attention can cover)."""
    return BatchLayout(max_tokens, max_tokens, causal_work(seq_len) / seq_len, CAUSAL)


def from_micro_batches(
    batches: Sequence[Sequence[Sequence[int]]], packed: bool, padded_length: Optional[Callable[[int], int]] = None
) -> BatchLayout:
    """The layout of ``batches``: each a list of rows, each row its documents' lengths (one per unpacked row).

    ``packed``: each micro-batch runs as one padding-free row of its documents (PACK_SEQUENCES=1); else each
    row is padded to the micro-batch's longest row, then to ``padded_length`` of it (the run's
    ``batch_padding.LengthRule``; default: the longest).
    """
    if not batches:
        raise ValueError("no micro-batches to describe")
    tokens, work = [], 0.0
    for rows in batches:
        if packed:
            tokens.append(sum(map(sum, rows)))
            work += sum(causal_work(length) for row in rows for length in row)
            continue
        longest = max(map(sum, rows))
        length = padded_length(longest) if padded_length else longest
        tokens.append(length * len(rows))
        work += causal_work(length) * len(rows)
    return BatchLayout(sum(tokens) / len(tokens), max(tokens), work / sum(tokens), VARLEN if packed else CAUSAL)


def first_lengths(
    batches: Sequence[Sequence[Sequence[int]]], packed: bool, padded_length: Callable[[int], int]
) -> List[int]:
    """For each micro-batch of a run, in order: 1 if it is padded rows whose padded length (``padded_length``
    of the longest row) no earlier micro-batch had, else 0 (what ``Workload.new_lengths`` counts; packed
    micro-batches count none: their one row's length is new almost every time and costs nothing measurable)."""
    seen, firsts = set(), []
    for rows in batches:
        length = None if packed else padded_length(max(map(sum, rows)))
        firsts.append(int(length is not None and length not in seen))
        seen.add(length)
    return firsts


def document_rows(lengths: Sequence[int], seq_len: int, packing: bool = False) -> List[List[int]]:
    """The rows samples of ``lengths`` tokens make, each the lengths of its documents: cut to ``seq_len``,
    and packed into rows of at most ``seq_len`` when ``packing`` (``data/packing.py``, in its row order)."""
    from ..data.packing import best_fit_decreasing

    cut = [min(int(n), seq_len) for n in lengths if n > 0]
    if not packing:
        return [[n] for n in cut]
    return [[cut[i] for i in members] for members in best_fit_decreasing(cut, seq_len)]


def micro_batches(
    lengths: Sequence[int],
    seq_len: int,
    batch_size: Optional[int] = None,
    max_tokens: Optional[int] = None,
    packing: bool = False,
) -> List[List[List[int]]]:
    """The micro-batches a run cuts samples of ``lengths`` tokens into: cut to ``seq_len``, packed into rows
    (``data/packing.py``) when ``packing``, sorted by length as the training order is
    (``data/tokenized.py``; the per-epoch shuffle only reorders whole batches), then ``batch_size`` rows or
    rows of at most ``max_tokens`` padded tokens a micro-batch (``data/global_batches.py``)."""
    from ..data.global_batches import token_budget_batches

    rows = sorted(document_rows(lengths, seq_len, packing), key=sum)
    if max_tokens:
        sizes = [sum(row) for row in rows]
        return [[rows[i] for i in batch] for batch in token_budget_batches(sizes, max_tokens)]
    if not batch_size:
        raise ValueError("give batch_size or max_tokens")
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
