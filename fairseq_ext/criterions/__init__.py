"""Losses for the Hugging Face heads."""

from . import classification, contrastive, lm_loss, question_answering  # noqa: F401
