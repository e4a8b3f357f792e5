"""Losses for the Hugging Face heads."""

from .lm_loss import CausalLMLoss  # noqa: F401
