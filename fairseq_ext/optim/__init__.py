"""Optimizers registered with fairseq (``--optimizer torch_adamw``)."""

from . import torch_adamw  # noqa: F401  (registration)
