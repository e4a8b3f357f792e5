"""Dataset types selectable by ``DATASET_TYPE`` / ``--dataset-type``.

A dataset type is a builder ``builder(cfg, split, tokenizer)`` that reads the raw records of one split
and returns tokenized samples: a ``datasets.Dataset`` or a list of dicts with ``input_ids`` and
``labels`` (same length; ``-100`` marks positions left out of the loss). The task truncates to
``--sequence-length`` and batches; builders never pad. Register your own from a ``--user-dir``::

    from fairseq_ext.data.registry import register_dataset_type

    @register_dataset_type("my_type")
    def build_my_split(cfg, split, tokenizer):
        ...
"""

from typing import Callable, Dict

from ..errors import UserInputError

DATASET_TYPES: Dict[str, Callable] = {}


def register_dataset_type(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make the decorated builder selectable as ``DATASET_TYPE=name``."""

    def register(builder: Callable) -> Callable:
        if name in DATASET_TYPES and DATASET_TYPES[name] is not builder:
            raise UserInputError(f"dataset type {name!r} is already registered by {DATASET_TYPES[name].__module__}")
        DATASET_TYPES[name] = builder
        return builder

    return register


def get_dataset_builder(name: str) -> Callable:
    """Look a builder up by name; an unknown name is a UserInputError listing the known ones."""
    if name not in DATASET_TYPES:
        raise UserInputError(f"unknown DATASET_TYPE {name!r}; registered types: {', '.join(sorted(DATASET_TYPES))}")
    return DATASET_TYPES[name]
