"""Data: dataset-type registry with the built-in ``instruction`` and ``disk`` types, prompt templates."""

from . import disk, instruction  # noqa: F401  (register the built-in dataset types)
from .prompts import PromptTemplate, register_prompt_template
from .registry import register_dataset_type

__all__ = ["PromptTemplate", "register_prompt_template", "register_dataset_type"]
