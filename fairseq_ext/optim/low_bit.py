"""``--optimizer-states`` (run.sh ``OPTIMIZER_STATES``): Adam's moments as the precision keeps them, or quantized
to 8 or 4 bits by torchao's low-bit AdamW (block-wise scales, https://arxiv.org/abs/2110.02861).

What each setting holds per trained parameter is read by the compile pass (``cube/cost.py``: memory and the
optimizer step's bytes) and by the runtime (``torchao_adamw.py``: the block size it quantizes in), so both
count the same bytes:

============  ==============================================================  ====================
states        Adam's two moments                                              bytes / parameter
============  ==============================================================  ====================
precision     as PRECISION keeps them (bf16-lean: bf16; fp32: float32)        4 or 8 (of cost.py)
8bit          one byte each, a float32 scale per block of 256 elements        2 x (1 + 4 / 256)
4bit          half a byte each, a float32 scale per block of 128 elements     2 x (0.5 + 4 / 128)
============  ==============================================================  ====================

Tensors under :data:`MIN_QUANTIZED` elements, or not a whole number of blocks, keep moments in their weight's
dtype (torchao's rule; norms and biases, a negligible share of a model). The weights are the precision's:
bf16 weights are rounded stochastically after each update (PRECISION=bf16-lean or fp8-lean), float32 weights
stay float32 (fp32, bf16 autocast); no master weights are kept, so bf16-master and fp8 are refused
(``cube/model_spec.py``). torchao is an optional dependency, installed on GPU machines only
(:data:`INSTALL`); this module itself needs none of it.
"""

from typing import Dict, NamedTuple

from ..errors import UserInputError

PRECISION_STATES = "precision"  # the default: the moments the precision keeps (cost.py's bytes)
INSTALL = "pip install torchao==0.18.0"
MIN_QUANTIZED = 4096  # tensors with fewer elements keep unquantized moments (torchao's threshold)
SCALE_BYTES = 4  # a float32 scale per block


class LowBitStates(NamedTuple):
    """One low-bit setting: the bits of each moment's element and the elements sharing a scale."""

    bits: int
    block_size: int

    @property
    def moment_bytes(self) -> float:
        """Bytes per element of one quantized moment, its block's scale included."""
        return self.bits / 8 + SCALE_BYTES / self.block_size


LOW_BIT: Dict[str, LowBitStates] = {
    "8bit": LowBitStates(8, 256),
    "4bit": LowBitStates(4, 128),
}
OPTIMIZER_STATES = (PRECISION_STATES, *LOW_BIT)
# the precisions low-bit states run under: bf16 weights without master weights, or float32 weights
WEIGHTS_KEPT = ("bf16-lean", "fp8-lean", "fp32", "bf16")


def check_states(states: str) -> None:
    """Refuse an ``--optimizer-states`` not in :data:`OPTIMIZER_STATES`, naming those that are."""
    if states not in OPTIMIZER_STATES:
        raise UserInputError(
            f"unknown OPTIMIZER_STATES {states!r} (--optimizer-states); choose one of {', '.join(OPTIMIZER_STATES)}"
        )


def is_low_bit(states: str) -> bool:
    """Whether ``states`` quantizes Adam's moments (torchao's low-bit AdamW steps the weights)."""
    check_states(states)
    return states in LOW_BIT


def state_bytes(states: str) -> float:
    """Bytes both moments of a low-bit setting hold per trained parameter (block scales included)."""
    if not is_low_bit(states):
        raise ValueError(f"OPTIMIZER_STATES={states} keeps the precision's moments: cost.py counts them")
    return 2 * LOW_BIT[states].moment_bytes


# torchao's low-bit step runs this many times slower than the bytes it moves at the memory's rate (one compiled
# call per tensor that dequantizes, updates and requantizes block by block). Fitted with the H200's cost parameters
# on runs 34-34c (benchmarks/results/single_gpu_speed, H200), Llama-3 8B full FT bf16-lean: one update of 2 x 2048
# tokens took 0.547 s with 8bit moments against 0.348 s with bf16 moments (one fused launch of 14 bytes a
# parameter), so torchao's step takes about 0.22 s over 8.03e9 parameters for the 14.1 bytes a parameter it moves.
# 4bit is taken to run as 8bit does (not measured).
STEP_SLOWDOWN = 10.0


def step_bytes(states: str, weight_bytes: int, grad_bytes: int) -> float:
    """Bytes at the memory's rate that the low-bit step's time is worth, per parameter: the gradient scaled in
    place first (fairseq's 1/sample-size factor and the clip coefficient: read and written), then torchao's
    step, which reads weight, gradient and both quantized moments and writes weight and moments, at
    :data:`STEP_SLOWDOWN` times the time those bytes take."""
    moments = state_bytes(states)
    return 2 * grad_bytes + STEP_SLOWDOWN * ((weight_bytes + grad_bytes + moments) + (weight_bytes + moments))


def low_bit_reasons(states: str, precision: str, one_process: bool, in_backward: bool, optimizer: str) -> list:
    """Why a run cannot keep ``states`` with these settings, each with what to change; empty when it can (or
    when ``states`` is the precision's own)."""
    if not is_low_bit(states):
        return []
    off = f"or OPTIMIZER_STATES={PRECISION_STATES}"
    reasons = []
    if precision not in WEIGHTS_KEPT:
        reasons.append(
            f"OPTIMIZER_STATES={states} steps the weights as they are (stochastic rounding for bf16, no float32 "
            f"master weights), but PRECISION={precision} keeps "
            + ("fairseq's fp16 optimizer" if precision == "fp16" else "float32 master weights")
            + f"; use PRECISION=bf16-lean (or fp8-lean, fp32), {off}"
        )
    if not one_process:
        reasons.append(
            f"OPTIMIZER_STATES={states} runs in one process (torchao's quantized moments are not sharded or split, "
            f"and its stochastic rounding is not kept equal over replicas); use NPROC_PER_NODE=1 NNODES=1 "
            f"PLAN_NGPUS=1 USE_ZERO=0, {off}"
        )
    if in_backward:
        reasons.append(f"OPTIMIZER_STATES={states} steps after the backward; use OPTIMIZER_IN_BACKWARD=0, {off}")
    if optimizer != "torch_adamw":
        reasons.append(f"OPTIMIZER_STATES={states} needs --optimizer torch_adamw, got --optimizer {optimizer}")
    return reasons


def torchao_adamw(params, states: str, lr: float, betas, eps: float, weight_decay: float):
    """torchao's low-bit AdamW for ``states`` over ``params`` (``torchao_adamw.low_bit_adamw``).

    Raises:
        UserInputError: torchao is not installed (it is an optional dependency, for GPU machines).
    """
    if not is_low_bit(states):
        raise ValueError(f"OPTIMIZER_STATES={states} is not a low-bit setting")
    try:
        from .torchao_adamw import low_bit_adamw
    except ImportError:
        raise UserInputError(
            f"OPTIMIZER_STATES={states} runs torchao's low-bit AdamW; install it ({INSTALL}) "
            f"or use OPTIMIZER_STATES={PRECISION_STATES}"
        ) from None
    return low_bit_adamw(params, states, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
