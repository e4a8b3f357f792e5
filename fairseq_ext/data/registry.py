"""Dataset types selectable by ``DATASET_TYPE`` / ``--dataset-type``.

A dataset type is a builder ``builder(cfg, split, tokenizer)`` that reads the raw records of one split
and returns tokenized samples: a ``datasets.Dataset`` or a list of dicts whose columns are those of
the model head's layout (``layouts.py``; for language models ``input_ids`` and ``labels`` of the same
length, ``-100`` marking positions left out of the loss). The task truncates to
``--sequence-length`` and batches; builders never pad. Register your own from a ``--user-dir``::

    from fairseq_ext.data.registry import register_dataset_type

    @register_dataset_type("my_type")
    def build_my_split(cfg, split, tokenizer):
        ...

Types for classification heads also give ``labels=reader``: ``reader(cfg)`` returns the
``LabelSet`` of the data (see ``labels.py``), which sets the model's ``num_labels``.
"""

from typing import Callable, Dict, Optional

from ..errors import UserInputError

DATASET_TYPES: Dict[str, Callable] = {}
LABEL_READERS: Dict[str, Callable] = {}


def register_dataset_type(name: str, labels: Optional[Callable] = None) -> Callable[[Callable], Callable]:
    """Decorator: make the decorated builder selectable as ``DATASET_TYPE=name``.

    Args:
        name: the value of ``DATASET_TYPE`` / ``--dataset-type``.
        labels: for data with class labels, ``labels(cfg) -> LabelSet`` read from the splits.
    """

    def register(builder: Callable) -> Callable:
        if name in DATASET_TYPES and DATASET_TYPES[name] is not builder:
            raise UserInputError(f"dataset type {name!r} is already registered by {DATASET_TYPES[name].__module__}")
        DATASET_TYPES[name] = builder
        if labels is not None:
            LABEL_READERS[name] = labels
        return builder

    return register


def get_label_reader(name: str) -> Optional[Callable]:
    """The label reader of dataset type ``name``, or None for data without class labels."""
    return LABEL_READERS.get(name)


def get_dataset_builder(name: str) -> Callable:
    """Look a builder up by name; an unknown name is a UserInputError listing the known ones."""
    if name not in DATASET_TYPES:
        raise UserInputError(f"unknown DATASET_TYPE {name!r}; registered types: {', '.join(sorted(DATASET_TYPES))}")
    return DATASET_TYPES[name]
