"""fairseq tasks."""

from .hf_finetune import HFFinetuneTask  # noqa: F401
