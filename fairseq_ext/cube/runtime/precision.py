"""Mixed precision of the cube runtime: bf16 autocast over fp32 master weights.

fairseq's own ``--bf16`` casts the model and, with ve-fairseq, crashes on GPUs (it takes the TPU
path); ``--fp16`` keeps working and stays fairseq's. ``bf16`` here is what Hugging Face's
``Trainer(bf16=True)`` does: weights, gradients and optimizer states stay fp32, the forward runs
under ``torch.autocast`` in bfloat16.
"""

import contextlib

import torch

from ...errors import UserInputError

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device):
    """A context for the forward pass: bf16 autocast for ``bf16``, nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise UserInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} (fp16: --fp16)")


def check_precision(precision: str, fp16: bool = False, bf16: bool = False) -> None:
    """A known precision; bf16 autocast and fairseq's own half precision (``--fp16``, ``--bf16``) exclude each other."""
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} (fp16: --fp16)")
    if precision == "bf16" and (fp16 or bf16):
        raise UserInputError("--precision bf16 is the runtime's bf16 autocast; drop --fp16/--bf16 (PRECISION=bf16 "
                             "alone) or use --precision fp32 with --fp16")
