"""AdamW updates of bf16 weights with bf16 moments (``bf16-lean``): one Triton kernel for all of them.

Unfused, the step runs about twenty float32 elementwise passes per chunk of each weight (casts, lerp,
addcmul, sqrt, addcdiv, the rounding's noise and its cast: 168 bytes per parameter moved).
:class:`LeanAdamWStep` reads the bf16 gradient (scaled as it is read), moments and weight once, computes in
float32, and writes the moments rounded to nearest and the weight rounded stochastically (14 bytes per
parameter), in one launch for every weight (``multi_tensor``). The rounding's noise comes from Philox inside
the kernel, keyed by a seed drawn on the host for each step and the tensor's index; one Philox call gives
four 32-bit words, the 16-bit noise of eight elements, one in each of the block's eight segments. Where
``found_inf`` is 1 it changes nothing. GPUs only (Triton).
"""

from typing import List

import torch

from .multi_tensor import OneLaunchAdamWStep, fits_one_launch, log2_beta, triton_available, triton_helpers

SEGMENT = 1024  # elements of a segment: 4 warps of 32 threads, 8 bf16 (16 bytes) each
SEGMENTS = 8  # per program: two 16-bit noises from each of Philox's four 32-bit words

_kernel = None


def takes_fused_lean_step(weight: torch.Tensor, state: dict) -> bool:
    """Whether ``weight`` with its bf16 moments in ``state`` is stepped by the Triton kernel: a plain (not
    DTensor) bf16 weight on a GPU, it, its bf16 gradient and moments contiguous, its step count on the GPU,
    and Triton installed."""
    return fits_one_launch(weight, state, ("exp_avg", "exp_avg_sq"), torch.bfloat16) and triton_available()


def _build_kernel():
    import triton
    import triton.language as tl

    helpers = triton_helpers()
    program_block, adam_scalars = helpers.program_block, helpers.adam_scalars

    @triton.jit
    def lean_segment(
        weight,
        grad,
        exp_avg,
        exp_avg_sq,
        offsets,
        mask,
        noise,
        scale,
        lr,
        step_size,
        bias_correction2_sqrt,
        beta1,
        beta2,
        eps,
        weight_decay,
    ):
        g = tl.load(grad + offsets, mask=mask).to(tl.float32) * scale
        m = tl.load(exp_avg + offsets, mask=mask).to(tl.float32)
        v = tl.load(exp_avg_sq + offsets, mask=mask).to(tl.float32)
        w = tl.load(weight + offsets, mask=mask).to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        w = w * (1.0 - lr * weight_decay) - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        # stochastic rounding: carry into bf16's last bit with probability (low 16 bits) / 2**16
        bits = (w.to(tl.int32, bitcast=True) + noise) & -65536
        tl.store(exp_avg + offsets, m.to(tl.bfloat16), mask=mask)
        tl.store(exp_avg_sq + offsets, v.to(tl.bfloat16), mask=mask)
        tl.store(weight + offsets, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)

    @triton.jit
    def lean_block(
        weight,
        grad,
        exp_avg,
        exp_avg_sq,
        offsets,
        numel,
        MASKED: tl.constexpr,
        r0,
        r1,
        r2,
        r3,
        scale,
        lr,
        step_size,
        bias_correction2_sqrt,
        beta1,
        beta2,
        eps,
        weight_decay,
        SEGMENT: tl.constexpr,
    ):
        for j in tl.static_range(8):  # segment j takes the low (even j) or high half of word j // 2
            if j // 2 == 0:
                word = r0
            elif j // 2 == 1:
                word = r1
            elif j // 2 == 2:
                word = r2
            else:
                word = r3
            noise = ((word >> (16 * (j % 2))) & 0xFFFF).to(tl.int32, bitcast=True)
            segment = offsets + j * SEGMENT
            if MASKED:
                lean_segment(
                    weight,
                    grad,
                    exp_avg,
                    exp_avg_sq,
                    segment,
                    segment < numel,
                    noise,
                    scale,
                    lr,
                    step_size,
                    bias_correction2_sqrt,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                )
            else:
                lean_segment(
                    weight,
                    grad,
                    exp_avg,
                    exp_avg_sq,
                    segment,
                    None,
                    noise,
                    scale,
                    lr,
                    step_size,
                    bias_correction2_sqrt,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                )

    @triton.jit(do_not_specialize=["seed"])
    def lean_adamw_kernel(
        table,
        block_tensor,
        first_block,
        numels,
        lr_ptr,
        scale_ptr,
        found_inf_ptr,
        seed,
        beta1,
        beta2,
        log2_beta1,
        log2_beta2,
        eps,
        weight_decay,
        SEGMENT: tl.constexpr,
    ):
        BLOCK = 8 * SEGMENT
        t, start, numel = program_block(block_tensor, first_block, numels, BLOCK)
        row = table + t * 5  # addresses of: weight, gradient, exp_avg, exp_avg_sq, step
        # torch's allocations are 16-byte aligned: telling Triton lets it move 16 bytes per access
        weight = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.bfloat16)), 16)
        grad = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.bfloat16)), 16)
        exp_avg = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.bfloat16)), 16)
        exp_avg_sq = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.bfloat16)), 16)
        step_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        if tl.load(found_inf_ptr) == 0:
            lr, step_size, bias_correction2_sqrt = adam_scalars(step_ptr, lr_ptr, log2_beta1, log2_beta2)
            scale = tl.load(scale_ptr)
            # Philox: key (this step's seed, the tensor), counter (the segment lane within the tensor)
            key = seed.to(tl.int64) + (t.to(tl.int64) << 32)
            counter = ((start // BLOCK) * SEGMENT).to(tl.int32) + tl.arange(0, SEGMENT)
            r0, r1, r2, r3 = tl.randint4x(key, counter)
            offsets = start + tl.arange(0, SEGMENT)
            if start + BLOCK <= numel:  # a whole block: no mask, so accesses are 16 bytes wide
                lean_block(
                    weight,
                    grad,
                    exp_avg,
                    exp_avg_sq,
                    offsets,
                    numel,
                    False,
                    r0,
                    r1,
                    r2,
                    r3,
                    scale,
                    lr,
                    step_size,
                    bias_correction2_sqrt,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    SEGMENT,
                )
            else:
                lean_block(
                    weight,
                    grad,
                    exp_avg,
                    exp_avg_sq,
                    offsets,
                    numel,
                    True,
                    r0,
                    r1,
                    r2,
                    r3,
                    scale,
                    lr,
                    step_size,
                    bias_correction2_sqrt,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    SEGMENT,
                )

    return lean_adamw_kernel


class LeanAdamWStep(OneLaunchAdamWStep):
    """Steps lists of bf16 weights with bf16 moments (``takes_fused_lean_step``) in one launch: moments
    rounded to nearest, weights stochastically, from a seed drawn on the host for each step."""

    BLOCK = SEGMENTS * SEGMENT

    def __init__(self, seed: int = 0x5EED):
        super().__init__()
        self._seeds = torch.Generator().manual_seed(seed)

    @staticmethod
    def row(param: torch.Tensor, state: dict) -> List[torch.Tensor]:
        return [param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]]

    def _launch(self, grid, table, layout, lr, scale, found_inf, betas, eps, weight_decay) -> None:
        global _kernel
        if _kernel is None:
            _kernel = _build_kernel()
        beta1, beta2 = betas
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self._seeds))
        _kernel[(grid,)](
            table,
            *layout,
            lr,
            scale,
            found_inf,
            seed,
            beta1,
            beta2,
            log2_beta(beta1),
            log2_beta(beta2),
            eps,
            weight_decay,
            SEGMENT=SEGMENT,
            num_warps=4,
        )
