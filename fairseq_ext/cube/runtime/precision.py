"""Precision of the cube runtime: which dtype weights live in, and the autocast of the forward.

fairseq's own ``--bf16`` casts the model and, with ve-fairseq, crashes on GPUs (it takes the TPU
path); ``--fp16`` keeps working and stays fairseq's. The runtime's settings (``--precision``,
run.sh ``PRECISION``):

- ``fp32``: everything in float32.
- ``bf16``: what Hugging Face's ``Trainer(bf16=True)`` does: weights, gradients and optimizer states
  stay float32, the forward runs under ``torch.autocast`` in bfloat16.
- ``bf16-master``: weights and gradients in bfloat16 (no casts in the forward, half the activation and
  gradient traffic); the optimizer (``--optimizer torch_adamw``) keeps float32 master weights and moments.
- ``bf16-lean``: bfloat16 weights, gradients and moments, no master weights; updates are rounded
  stochastically. 8 bytes per parameter: the full finetune of the largest model that fits.
- ``fp8``: bf16-master whose decoder blocks' linear layers multiply in float8 (``runtime/float8.py``, torchao's
  float8 training; GPUs of compute capability 8.9 or newer). Weights, checkpoints and exports are bf16-master's.
- ``fp8-lean``: the same float8 linear layers over bf16-lean's weights and optimizer (an 8B full finetune on
  one 80 GB GPU).
"""

import contextlib
from typing import Optional

import torch

from ...errors import UserInputError

PRECISIONS = ("fp32", "bf16", "bf16-master", "bf16-lean", "fp8", "fp8-lean")
BF16_WEIGHTS = ("bf16-master", "bf16-lean", "fp8", "fp8-lean")  # the model is loaded in bfloat16
FLOAT8 = ("fp8", "fp8-lean")  # the decoder blocks' linear layers multiply in float8
# what each precision keeps of weights, gradients and optimizer states, where that is another precision's
_STORED_AS = {"fp8": "bf16-master", "fp8-lean": "bf16-lean"}
NEEDS_OPTIMIZER = "torch_adamw"  # the optimizer that keeps master weights / rounds stochastically


def _unknown(precision: str) -> UserInputError:
    return UserInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} (fp16: --fp16)")


def autocast(precision: str, device: torch.device):
    """A context for the forward pass: bf16 autocast for ``bf16``, nothing for the others."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision in PRECISIONS:
        return contextlib.nullcontext()
    raise _unknown(precision)


def stored_as(precision: str) -> str:
    """The precision whose weights, gradients and optimizer states (bytes, optimizer step, profile dtypes)
    ``precision`` keeps: fp8 keeps bf16-master's, fp8-lean bf16-lean's; the others their own."""
    return _STORED_AS.get(precision, precision)


def weight_dtype(precision: str) -> Optional[str]:
    """The dtype (a ``--hf-dtype`` name) the model's weights are loaded in under ``precision``, or None to
    keep the model's ``--hf-dtype``."""
    return "bfloat16" if precision in BF16_WEIGHTS else None


def reduce_dtype(precision: str, replicas: int) -> Optional[torch.dtype]:
    """The dtype FSDP2 sums gradients over ``replicas`` data-parallel units in (its ``MixedPrecisionPolicy``
    ``reduce_dtype``), or None for the gradients' own: float32 for ``bf16-master``, whose bf16 gradients are
    summed in float32 and rounded to bf16 once, for the float32 master step (``bf16-lean`` keeps bf16: no
    float32 state to feed; fp32 and bf16 autocast have float32 gradients already; fp8 and fp8-lean as the
    precisions they are stored as). One replica (one GPU at a ZeRO level) sums nothing: its bf16 gradients
    stay bf16, as without FSDP2 (a float32 round trip would give the same values for three more passes over
    them)."""
    if precision not in PRECISIONS:
        raise _unknown(precision)
    return torch.float32 if stored_as(precision) == "bf16-master" and replicas > 1 else None


def check_precision(precision: str, fp16: bool = False, bf16: bool = False, optimizer: Optional[str] = None) -> None:
    """A known precision; the runtime's bf16 settings and fairseq's own half precision (``--fp16``,
    ``--bf16``) exclude each other; bf16 weights need ``--optimizer torch_adamw``."""
    if precision not in PRECISIONS:
        raise _unknown(precision)
    if precision != "fp32" and (fp16 or bf16):
        raise UserInputError(
            f"--precision {precision} is the runtime's bf16; drop --fp16/--bf16 "
            f"(PRECISION={precision} alone) or use --precision fp32 with --fp16"
        )
    if precision in BF16_WEIGHTS and optimizer is not None and optimizer != NEEDS_OPTIMIZER:
        raise UserInputError(
            f"PRECISION={precision} keeps bf16 weights and needs --optimizer {NEEDS_OPTIMIZER} "
            f"(its float32 master weights / stochastic rounding); got --optimizer {optimizer}"
        )
