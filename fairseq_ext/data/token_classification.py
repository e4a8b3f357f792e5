"""The ``token_classification`` dataset type: words with one tag each (e.g. BIO named entities).

Files: ``{data}/{dataset_name}_{split}.json`` whose records hold ``tokens`` (a list of words) and
``tags`` (a list of the same length: tag names or ids). Words are split into sub-word tokens; the
first token of each word carries the word's tag, the others and the special tokens are ignored.
"""

from typing import Dict, List

from ..errors import UserInputError
from .labels import LabelSet, label_set
from .layouts import IGNORE_INDEX
from .records import read_present_splits, read_split, split_path
from .registry import register_dataset_type

FIELDS = {"tokens": list, "tags": list}


def check_tags(records: List[Dict], path: str) -> None:
    """Each record has as many tags as words, and words are strings."""
    for record in records:
        where = f"{path}: line {record.get('__line__', '?')}"
        if len(record["tokens"]) != len(record["tags"]):
            raise UserInputError(
                f"{where}: {len(record['tokens'])} tokens but {len(record['tags'])} tags; give one tag per word"
            )
        if not all(isinstance(word, str) for word in record["tokens"]):
            raise UserInputError(f"{where}: tokens must be a list of strings")


def read_tag_labels(cfg) -> LabelSet:
    """The tag set of the data; a tag in valid or test that train lacks is a UserInputError."""
    splits = read_present_splits(cfg.data, cfg.dataset_name, FIELDS)
    for split, records in splits.items():
        check_tags(records, split_path(cfg.data, cfg.dataset_name, split))
    return label_set({split: [t for r in records for t in r["tags"]] for split, records in splits.items()}, "tag")


def align_word_labels(word_ids: List, word_labels: List[int]) -> List[int]:
    """Per-token labels: the word's label on its first token, -100 on later tokens and special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def tokenize_words(tokenizer, words: List[str]) -> Dict[str, List]:
    """Encode pre-split words; returns ``input_ids`` and ``word_ids`` (the word of each token)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(
            "token classification needs a fast tokenizer (one with word_ids); this model's tokenizer is a slow one"
        )
    encoded = tokenizer(words, is_split_into_words=True)
    return {"input_ids": list(encoded["input_ids"]), "word_ids": encoded.word_ids()}


@register_dataset_type("token_classification", labels=read_tag_labels)
def build_token_classification_split(cfg, split: str, tokenizer) -> List[Dict]:
    """Builder for ``DATASET_TYPE=token_classification``: ``input_ids`` and per-token ``labels``."""
    records = read_split(cfg.data, cfg.dataset_name, split, FIELDS)
    check_tags(records, split_path(cfg.data, cfg.dataset_name, split))
    tags = read_tag_labels(cfg)
    samples = []
    for record in records:
        encoded = tokenize_words(tokenizer, record["tokens"])
        word_labels = [tags.index(t) for t in record["tags"]]
        samples.append(
            {"input_ids": encoded["input_ids"], "labels": align_word_labels(encoded["word_ids"], word_labels)}
        )
    return samples
