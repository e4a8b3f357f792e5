"""Data: dataset-type registry with the built-in types, sample layouts per head, prompt templates."""

from . import chat, classification, disk, instruction, question_answering, text_pairs, token_classification  # noqa: F401
from .labels import LabelSet
from .prompts import PromptTemplate, register_prompt_template
from .registry import register_dataset_type

__all__ = ["LabelSet", "PromptTemplate", "register_prompt_template", "register_dataset_type"]
