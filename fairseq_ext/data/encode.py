"""Token ids of many texts in one call, the ids ``tokenizer(texts)["input_ids"]`` gives, with less work per text.

A tokenizer that is a Rust ``tokenizers`` backend and nothing more (transformers' ``TokenizersBackend`` whose
class adds no Python steps of its own) is asked through the backend's ``encode_batch_fast``: the same ids,
without the character offsets and the per-text dictionaries that ``tokenizer(texts)`` builds. Any other
tokenizer (a slow one, or a class that rewrites texts or switches modes in Python) is called as it is.
"""

from typing import Callable, List

import numpy as np
import pyarrow as pa

Encoder = Callable[[List[str], bool], List[List[int]]]


def _plain_backend(tokenizer) -> bool:
    """Whether ``tokenizer(texts)`` is exactly the backend's ``encode_batch`` of the texts."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and cls._encode_plus is TokenizersBackend._encode_plus
        and cls.__call__ is PreTrainedTokenizerBase.__call__
        and not hasattr(tokenizer, "_switch_to_input_mode")
        and hasattr(tokenizer.backend_tokenizer, "encode_batch_fast")
    )


def batch_encoder(tokenizer) -> Encoder:
    """``encode(texts, add_special_tokens)``: the token ids of each text as fresh lists (see the module docstring)."""
    if not _plain_backend(tokenizer):
        return lambda texts, add_special_tokens: tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    backend = tokenizer.backend_tokenizer

    def encode(texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        # the state tokenizer(texts) sets on the backend before every call: no truncation, no padding
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        if backend.encode_special_tokens != tokenizer.split_special_tokens:
            backend.encode_special_tokens = tokenizer.split_special_tokens
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    return encode


def int32_lists(rows: List[List[int]]) -> pa.ListArray:
    """``rows`` as an Arrow list<int32> column."""
    return pa.array(rows, type=pa.list_(pa.int32()))


def with_masked_prefix(ids: pa.ListArray, prefix_lengths: List[int], fill: int) -> pa.ListArray:
    """A copy of ``ids`` whose first ``prefix_lengths[i]`` values of row ``i`` are ``fill`` (same offsets)."""
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].copy()
    lengths = np.diff(offsets)
    position = np.arange(len(values), dtype=np.int64) - np.repeat(offsets[:-1] - offsets[0], lengths)
    values[position < np.repeat(np.asarray(prefix_lengths, dtype=np.int64), lengths)] = fill
    return pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), pa.array(values, type=ids.type.value_type))
