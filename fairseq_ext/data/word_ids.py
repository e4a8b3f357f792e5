"""Token ids of many normalized ASCII texts, word by word: the words split with Arrow's compute functions, each
distinct word tokenized once by the backend's model and remembered.

It earns its place by speed: for BERT's pre-tokenizer and a 30k WordPiece vocabulary, the backend's
``encode_batch_fast`` spends about 0.37 ms of CPU per text of 250 tokens (string splits with alignment
bookkeeping, a ``String`` per token, an ``Encoding`` of seven vectors per text); this path spends
0.03-0.05 ms (regex, split, dictionary encoding in Arrow's C++ kernels, one dictionary look-up per distinct
word of a batch, numpy gathers). The ids are the backend's: a tokenizer's model sees one pre-tokenized word
at a time, so the word's ids do not depend on its neighbours.

Only what is simple on ASCII is done here (``BatchEncoder`` in ``encode.py`` decides which texts come here
and checks the whole path against the backend on probe texts):

- BERT's pre-tokenizer: split on whitespace (removed) and on punctuation (each mark a word of its own); in
  ASCII every printable character other than a letter, a digit or a space is punctuation for it;
- the post-processor's special tokens around a text (``add_special_tokens``): a fixed prefix and suffix.
"""

import json
from itertools import chain
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PUNCTUATION = r"([^A-Za-z0-9 \t\n\r])"
# post-processors that put fixed special tokens before and after a single text
AFFIX_PROCESSORS = (None, "TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel")
# words remembered before the table starts over (a dictionary entry costs about 150 bytes)
MAX_WORDS = 1_000_000


class Rows:
    """Rows of int32 token ids: row ``i`` is ``values[starts[i] : starts[i] + lengths[i]]``."""

    def __init__(self, starts: np.ndarray, lengths: np.ndarray, values: np.ndarray):
        self.starts, self.lengths, self.values = starts, lengths, values

    def to_lists(self) -> List[List[int]]:
        flat = self.values.tolist()
        return [flat[s : s + n] for s, n in zip(self.starts.tolist(), self.lengths.tolist())]

    def to_arrow(self) -> pa.ListArray:
        return join_rows([self])


def join_rows(parts: List[Rows]) -> pa.ListArray:
    """An Arrow list<int32> column whose row ``i`` is row ``i`` of every part, one after the other."""
    lengths = sum(part.lengths for part in parts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int32)
    before = offsets[:-1].copy()
    for part in parts:
        count = int(part.lengths.sum())
        # position in ``values`` of each value of the part: its row's place plus its place in the row
        shift = np.repeat(before - np.cumsum(part.lengths) + part.lengths, part.lengths)
        values[shift + np.arange(count)] = part.values[np.repeat(part.starts, part.lengths) + _ranks(part.lengths)]
        before += part.lengths
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _ranks(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ..., n-1 for each length n, concatenated."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.arange(total) - np.repeat(ends - lengths, lengths)


def affixes(backend) -> Optional[Tuple[List[int], List[int]]]:
    """The ids the post-processor of ``backend`` (set to neither truncate nor pad) puts before and after a
    single text, or None for a post-processor not known to add only those."""
    processor = json.loads(backend.to_str()).get("post_processor")
    if (processor or {}).get("type") not in AFFIX_PROCESSORS:
        return None
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return None


def bert_words(spec: dict) -> bool:
    """Whether the backend of serialized form ``spec`` splits words as BERT's pre-tokenizer does and tokenizes
    each word the same way every time (no BPE dropout)."""
    return (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer" and not (spec.get("model") or {}).get(
        "dropout"
    )


class WordIds:
    """``words(normalized_texts, add_special_tokens) -> Rows``: the backend's ids of texts already normalized,
    ASCII, printable but for tab, newline and carriage return (see the module docstring)."""

    def __init__(self, backend, prefix: List[int], suffix: List[int]):
        self.model = backend.model
        self.prefix = np.asarray(prefix, dtype=np.int32)
        self.suffix = np.asarray(suffix, dtype=np.int32)
        self.known: Dict[str, Tuple[int, ...]] = {"": ()}

    def _word_ids(self, words: List[str]) -> List[Tuple[int, ...]]:
        if len(self.known) > MAX_WORDS:
            self.known = {"": ()}
        known = self.known
        found = [known.get(word) for word in words]
        for i, ids in enumerate(found):
            if ids is None:
                found[i] = known[words[i]] = tuple(token.id for token in self.model.tokenize(words[i]))
        return found

    def __call__(self, texts: List[str], add_special_tokens: bool) -> Rows:
        spaced = pc.replace_substring_regex(pa.array(texts, pa.string()), pattern=PUNCTUATION, replacement=r" \1 ")
        words = pc.ascii_split_whitespace(spaced)
        encoded = pc.dictionary_encode(words.flatten())
        distinct = self._word_ids(encoded.dictionary.to_pylist())
        word_lengths = np.fromiter(map(len, distinct), dtype=np.int64, count=len(distinct))
        word_values = np.fromiter(chain.from_iterable(distinct), dtype=np.int32, count=int(word_lengths.sum()))
        index = encoded.indices.to_numpy()
        lengths = word_lengths[index]
        starts = np.cumsum(word_lengths) - word_lengths
        values = word_values[np.repeat(starts[index], lengths) + _ranks(lengths)]
        token_ends = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=token_ends[1:])
        text_offsets = token_ends[words.offsets.to_numpy()]
        rows = Rows(text_offsets[:-1], np.diff(text_offsets), values)
        if add_special_tokens and (len(self.prefix) or len(self.suffix)):
            count = len(texts)
            fixed = [
                Rows(np.zeros(count, np.int64), np.full(count, len(affix), np.int64), affix)
                for affix in (self.prefix, self.suffix)
            ]
            joined = join_rows([fixed[0], rows, fixed[1]])
            offsets = joined.offsets.to_numpy().astype(np.int64)
            rows = Rows(offsets[:-1], np.diff(offsets), joined.values.to_numpy())
        return rows
