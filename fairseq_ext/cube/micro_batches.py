"""Micro-batches without pipeline stages: a plan with pp 1 and ``num_microbatches`` m > 1 runs each batch as m
parts, one forward and backward each, accumulating gradients inside the update.

The causal-LM criterion sums its loss over trained tokens and fairseq divides the summed gradients by the
summed ``sample_size``, so the parts give the batch's own loss and gradients (up to the order of the sums):
the compile pass uses this when a ``BATCH_SIZE`` does not fit memory at once (``model_spec`` allows it for
the causal LM only).
"""

from typing import List

import torch

from ..data.layouts import IGNORE_INDEX


def split_batch(sample, parts: int) -> List:
    """``sample`` (a causal-LM batch: ``net_input``, ``target``, ``id``, ``nsentences``, ``ntokens``) as up to
    ``parts`` samples of consecutive rows, with their own ``nsentences`` and ``ntokens``; fairseq's empty or
    dummy batches, and ``parts`` 1, stay whole."""
    if parts == 1 or not isinstance(sample, dict) or not sample or "net_input" not in sample:
        return [sample]
    if "document_lengths" in sample["net_input"]:
        return _split_documents(sample, parts)
    rows = sample["net_input"]["input_ids"].size(0)
    starts = [int(part[0]) for part in torch.arange(rows).tensor_split(parts) if len(part)]
    pieces = []
    for start, stop in zip(starts, [*starts[1:], rows]):
        piece = _rows(sample, start, stop, rows)
        piece["nsentences"] = stop - start
        piece["ntokens"] = int((piece["target"] != IGNORE_INDEX).sum())
        pieces.append(piece)
    return pieces


def _rows(value, start: int, stop: int, rows: int):
    if torch.is_tensor(value) and value.dim() and value.size(0) == rows:
        return value[start:stop]
    if isinstance(value, dict):
        return {key: _rows(item, start, stop, rows) for key, item in value.items()}
    return value


def _split_documents(sample, parts: int) -> List:
    """A padding-free packed batch (one row of whole documents, ``layouts.padding_free``) as up to ``parts``
    rows of consecutive documents, of about equal numbers of tokens."""
    lengths = sample["net_input"]["document_lengths"][0].tolist()
    ends = torch.tensor(lengths).cumsum(0).tolist()
    cuts = sorted(
        {min(range(len(ends)), key=lambda d: abs(ends[d] - ends[-1] * k / parts)) + 1 for k in range(1, parts)}
    )
    cuts = [0, *[c for c in cuts if 0 < c < len(lengths)], len(lengths)]
    pieces = []
    for first, last in zip(cuts[:-1], cuts[1:]):
        start, stop = ([0, *ends][first], ends[last - 1])
        net_input = {k: v[:, start:stop] for k, v in sample["net_input"].items() if k in ("input_ids", "position_ids")}
        net_input["document_lengths"] = sample["net_input"]["document_lengths"][:, first:last]
        net_input["max_document_length"] = max(lengths[first:last])
        target = sample["target"][:, start:stop]
        pieces.append(
            dict(
                sample,
                net_input=net_input,
                target=target,
                nsentences=last - first,
                ntokens=int((target != IGNORE_INDEX).sum()),
            )
        )
    return pieces
