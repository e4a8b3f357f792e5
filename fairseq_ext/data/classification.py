"""The ``classification`` dataset type: texts (or text pairs) with a class label.

Files: ``{data}/{dataset_name}_{split}.json`` whose records hold ``text``, an optional ``text_pair``
(both strings) and ``label``: a class name (string) or a class id (integer). The classes are
those of the train split; ``num_labels`` and the label names of the model come from them.
"""

from typing import Dict, List

from .labels import LabelSet, label_set
from .records import read_present_splits, read_split, require_fields, split_path
from .registry import register_dataset_type

FIELDS = {"text": str, "label": (str, int)}


def read_classification_labels(cfg) -> LabelSet:
    """The label set of the data; a label in valid or test that train lacks is a UserInputError."""
    splits = read_present_splits(cfg.data, cfg.dataset_name, FIELDS)
    return label_set({split: [r["label"] for r in records] for split, records in splits.items()})


def tokenize_text_or_pair(tokenizer, record: Dict) -> Dict[str, List[int]]:
    """``input_ids`` (and ``token_type_ids`` where the tokenizer makes them) of ``text`` [+ ``text_pair``]."""
    encoded = tokenizer(record["text"], record.get("text_pair"))
    out = {"input_ids": list(encoded["input_ids"])}
    if "token_type_ids" in encoded:
        out["token_type_ids"] = list(encoded["token_type_ids"])
    return out


@register_dataset_type("classification", labels=read_classification_labels)
def build_classification_split(cfg, split: str, tokenizer) -> List[Dict]:
    """Builder for ``DATASET_TYPE=classification``: ``input_ids`` and the class index ``label``."""
    records = read_split(cfg.data, cfg.dataset_name, split, FIELDS)
    require_fields(
        [r for r in records if "text_pair" in r], ["text_pair"], split_path(cfg.data, cfg.dataset_name, split)
    )
    labels = read_classification_labels(cfg)
    return [{**tokenize_text_or_pair(tokenizer, r), "label": labels.index(r["label"])} for r in records]
