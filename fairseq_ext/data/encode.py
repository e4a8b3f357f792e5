"""Token ids of many texts in one call, the ids ``tokenizer(texts)["input_ids"]`` gives, with less work per text.

A tokenizer that is a Rust ``tokenizers`` backend and nothing more (transformers' ``TokenizersBackend`` whose
class adds no Python steps of its own) is asked through the backend's ``encode_batch_fast``: the same ids,
without the character offsets and the per-text dictionaries that ``tokenizer(texts)`` builds. Any other
tokenizer (a slow one, or a class that rewrites texts or switches modes in Python) is called as it is.

Normalizers that keep alignments cost about half of a WordPiece tokenizer's time (BERT's normalizer runs
NFD, accent stripping and a pass per step over every character). What the known ones do to ASCII text is
simple (see :func:`ascii_steps`), so an ASCII text without control characters and without the text of any
added token is normalized here with ``str`` methods and tokenized by a copy of the backend without
normalizer: the same normalized string, so the same pieces and ids. Where the backend splits words as BERT's
pre-tokenizer does, these texts are tokenized word by word instead (``word_ids.py``, a fifth of the work or
less). Every other text goes through the backend itself.
"""

from itertools import chain
from typing import Callable, List, Optional

import numpy as np
import pyarrow as pa

from .word_ids import Rows, WordIds, affixes, bert_words


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


def _whitespace_to_spaces(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def ascii_steps(spec: Optional[dict]) -> Optional[List[Callable[[str], str]]]:
    """What the normalizer of serialized form ``spec`` does to ASCII text without control characters, as
    ``str -> str`` steps; None for a normalizer not known here. Unicode normalization (NFC, NFD, NFKC, NFKD)
    and accent stripping change no ASCII character; Chinese characters are not ASCII; BERT's clean_text turns
    tab, newline and carriage return into spaces."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind in ("NFC", "NFD", "NFKC", "NFKD", "StripAccents"):
        return []
    if kind == "Lowercase":
        return [str.lower]
    if kind == "BertNormalizer":
        return ([_whitespace_to_spaces] if spec.get("clean_text") else []) + (
            [str.lower] if spec.get("lowercase") else []
        )
    if kind == "Sequence":
        steps = [ascii_steps(part) for part in spec.get("normalizers", [])]
        return None if any(s is None for s in steps) else [f for s in steps for f in s]
    return None


# ASCII characters that are not control characters for the normalizers: printable ones, tab, newline, return
PRINTABLE_OR_SPACE = bytes(range(32, 127)) + b"\t\n\r"
PROBE = "The quick, brown fox (aged 3) jumps over 2 lazy dogs!\nCAN'T stop: a_b-c / x.y? #1 @home [ok] 100%\r\n"


class BatchEncoder:
    """``encoder(texts, add_special_tokens)``: the token ids of each text as fresh lists, those of
    ``tokenizer(texts, add_special_tokens=...)["input_ids"]`` (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.fast = _plain_backend(tokenizer)
        self.unnormalized, self.steps, self.added, self.added_starts = None, None, (), set()
        self.words: Optional[WordIds] = None
        if self.fast:
            import json

            from tokenizers import Tokenizer

            spec = json.loads(tokenizer.backend_tokenizer.to_str())
            self.steps = ascii_steps(spec.get("normalizer"))
            if spec.get("normalizer") is not None and self.steps is not None:
                self.unnormalized = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
                self.unnormalized.normalizer = None
                self.unnormalized.no_truncation()
                self.unnormalized.no_padding()
                self.added = tuple(token["content"] for token in spec.get("added_tokens", []) if token["content"])
                self.added_starts = {token[0] for token in self.added}
                special = affixes(self.unnormalized) if bert_words(spec) else None
                if special is not None:
                    self.words = WordIds(self.unnormalized, *special)
                    if self._ascii_path_differs():
                        self.words = None
                if self._ascii_path_differs():
                    self.unnormalized = None

    def _ascii_path_differs(self) -> bool:
        """Whether the ASCII path gives other ids than the backend for a few probe texts (a safeguard: a
        tokenizer whose parts behave otherwise than their serialized form says keeps the backend path)."""
        probes = [PROBE, PROBE.upper(), PROBE.replace(" ", "\t"), "", " ".join(PROBE.split()[::-1]), "w" * 120]
        probes = [text for text in probes if self._ascii_normalized(text) is not None]
        backend = self.tokenizer.backend_tokenizer
        return any(self(probes, special) != self._encode(backend, probes, special) for special in (True, False))

    def __call__(self, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        if not self.fast:
            return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        backend = self.tokenizer.backend_tokenizer
        out: List[Optional[List[int]]] = [None] * len(texts)
        rest = list(range(len(texts)))
        if self.unnormalized is not None:
            simple, normalized, rest = [], [], []
            for i, text in enumerate(texts):
                done = self._ascii_normalized(text)
                if done is None:
                    rest.append(i)
                else:
                    simple.append(i)
                    normalized.append(done)
            if self.words is not None:
                done = self.words(normalized, add_special_tokens).to_lists()
            else:
                done = self._encode(self.unnormalized, normalized, add_special_tokens)
            for i, ids in zip(simple, done):
                out[i] = ids
        if rest:
            batch = texts if len(rest) == len(texts) else [texts[i] for i in rest]
            for i, ids in zip(rest, self._encode(backend, batch, add_special_tokens)):
                out[i] = ids
        return out

    def rows(self, texts: List[str], add_special_tokens: bool) -> Rows:
        """The ids of ``self(texts, add_special_tokens)`` as :class:`Rows` (no Python lists where every text
        takes the word path)."""
        if self.words is not None:
            normalized = [self._ascii_normalized(text) for text in texts]
            if None not in normalized:
                return self.words(normalized, add_special_tokens)
        ids = self(texts, add_special_tokens)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return Rows(np.cumsum(lengths) - lengths, lengths, values)

    def _ascii_normalized(self, text: str) -> Optional[str]:
        """``text`` as the backend's normalizer leaves it, or None when it is not that simple."""
        if not text.isascii() or text.encode("ascii").translate(None, PRINTABLE_OR_SPACE):  # a control character
            return None
        normalized = text
        for step in self.steps:
            normalized = step(normalized)
        if any(c in text or c in normalized for c in self.added_starts) and any(
            token in text or token in normalized for token in self.added
        ):
            return None
        return normalized

    def _encode(self, backend, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
        # the state tokenizer(texts) sets on the backend before every call: no truncation, no padding
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        if backend.encode_special_tokens != self.tokenizer.split_special_tokens:
            backend.encode_special_tokens = self.tokenizer.split_special_tokens
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def with_masked_prefix(ids: pa.ListArray, prefix_lengths: List[int], fill: int) -> pa.ListArray:
    """A copy of ``ids`` whose first ``prefix_lengths[i]`` values of row ``i`` are ``fill`` (same offsets)."""
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].copy()
    lengths = np.diff(offsets)
    position = np.arange(len(values), dtype=np.int64) - np.repeat(offsets[:-1] - offsets[0], lengths)
    values[position < np.repeat(np.asarray(prefix_lengths, dtype=np.int64), lengths)] = fill
    return pa.ListArray.from_arrays(pa.array(offsets - offsets[0]), pa.array(values, type=ids.type.value_type))
