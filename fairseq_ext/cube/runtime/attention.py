"""Which kernel runs ``scaled_dot_product_attention`` (Hugging Face's ``sdpa`` attention).

PyTorch tries its backends in a fixed order, FlashAttention (v2) first. On Hopper GPUs (compute
capability 9.x) cuDNN's fused attention is faster for training shapes, grouped-query attention
included, so ``auto`` puts it first there; a shape cuDNN cannot serve falls back to the usual order.
``torch`` keeps PyTorch's order everywhere. The order is read when a forward picks its kernel (also
when ``torch.compile`` traces a layer), so it wraps every forward of the runtime.
"""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...errors import UserInputError

SDPA_PRIORITIES = ("auto", "torch")
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def sdpa_priority(choice: str, device: torch.device):
    """A context for the forward pass: cuDNN attention first on Hopper GPUs under ``auto``, else nothing."""
    if choice not in SDPA_PRIORITIES:
        raise UserInputError(f"unknown --sdpa-priority {choice!r}; choose one of {', '.join(SDPA_PRIORITIES)}")
    if choice == "auto" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return sdpa_kernel(CUDNN_FIRST, set_priority=True)
    return contextlib.nullcontext()
