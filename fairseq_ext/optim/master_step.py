"""AdamW updates of bf16 weights from their float32 master weights: one Triton kernel for all of them.

torch's fused AdamW wants gradients in its parameters' dtype, so a bf16 weight with a float32 master
costs three passes over memory: cast the bf16 gradient to a float32 copy, step the master, round the
master back into the weight (40 bytes per parameter moved; 17 ms of a 221 ms update of a 1.1B model on
an H200). :class:`MasterAdamWStep` does the same update in one pass, in one launch for every weight (a
table of the tensors' addresses, as torch's multi-tensor kernels): the gradient is read in bf16 and
scaled as it is read, master and moments are updated and the weight written (28 bytes per parameter).
Where ``found_inf`` is 1 it changes nothing, as torch's fused kernel. GPUs only (Triton).
"""

import functools
import importlib.util
import math
from typing import Dict, List, Tuple

import torch
from torch.distributed.tensor import DTensor

BLOCK = 1024  # elements per program (4 warps): 4.1 TB/s on an H200 over a 1.1B model's weights
_MAX_CACHED_LAYOUTS = 16  # lists of sizes (param groups, devices) whose block maps are kept

_kernel = None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (torch's CUDA wheels bring it; without it the step stays unfused)."""
    return importlib.util.find_spec("triton") is not None


def takes_fused_master_step(weight: torch.Tensor, state: dict) -> bool:
    """Whether ``weight`` with its optimizer ``state`` (float32 master and moments) is stepped by the
    Triton kernel: a plain (not DTensor) bf16 weight on a GPU, it, its bf16 gradient and states contiguous,
    its step count on the GPU, and Triton installed."""
    grad = weight.grad
    return weight.is_cuda and weight.dtype == torch.bfloat16 and not isinstance(weight, DTensor) and \
        grad is not None and grad.dtype == torch.bfloat16 and \
        state["step"].is_cuda and \
        all(t.is_contiguous() for t in (weight, grad, state["master"], state["exp_avg"], state["exp_avg_sq"])) \
        and triton_available()


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_block(weight, grad, master, exp_avg, exp_avg_sq, offsets, mask, scale, lr, step_size,
                    bias_correction2_sqrt, beta1, beta2, eps, weight_decay):
        g = tl.load(grad + offsets, mask=mask).to(tl.float32) * scale
        m = tl.load(exp_avg + offsets, mask=mask)
        v = tl.load(exp_avg_sq + offsets, mask=mask)
        w = tl.load(master + offsets, mask=mask)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        w = w * (1.0 - lr * weight_decay) - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(exp_avg + offsets, m, mask=mask)
        tl.store(exp_avg_sq + offsets, v, mask=mask)
        tl.store(master + offsets, w, mask=mask)
        tl.store(weight + offsets, w.to(tl.bfloat16), mask=mask)

    @triton.jit
    def master_adamw_kernel(table, block_tensor, first_block, numels, lr_ptr, scale_ptr, found_inf_ptr,
                            beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        row = table + t * 6  # addresses of: weight, gradient, master, exp_avg, exp_avg_sq, step
        # torch's allocations are 16-byte aligned: telling Triton lets it move 16 bytes per access
        weight = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.bfloat16)), 16)
        grad = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.bfloat16)), 16)
        master = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
        exp_avg = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.float32)), 16)
        exp_avg_sq = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.float32)), 16)
        step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        if tl.load(found_inf_ptr) == 0:
            step = tl.load(step_ptr)  # the count after this step (the caller adds 1 first)
            lr = tl.load(lr_ptr)
            step_size = lr / (1.0 - tl.exp2(step * log2_beta1))
            bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
            start = (pid - tl.load(first_block + t)).to(tl.int64) * BLOCK
            offsets = start + tl.arange(0, BLOCK)
            numel = tl.load(numels + t)
            scale = tl.load(scale_ptr)
            if start + BLOCK <= numel:  # a whole block: no mask, so accesses are 16 bytes wide
                adamw_block(weight, grad, master, exp_avg, exp_avg_sq, offsets, None, scale, lr, step_size,
                            bias_correction2_sqrt, beta1, beta2, eps, weight_decay)
            else:
                adamw_block(weight, grad, master, exp_avg, exp_avg_sq, offsets, offsets < numel, scale, lr,
                            step_size, bias_correction2_sqrt, beta1, beta2, eps, weight_decay)

    return master_adamw_kernel


class MasterAdamWStep:
    """Steps lists of bf16 weights with float32 masters (``takes_fused_master_step``) in one launch.

    Which program handles which block of which tensor depends on the tensors' sizes only, so that map is
    built once per list of sizes; the tensors' addresses (gradients are new each update) go with each step.
    """

    def __init__(self):
        # (device, sizes) -> block -> tensor index, each tensor's first block, sizes: on that device
        self._layouts: Dict[Tuple[torch.device, Tuple[int, ...]], Tuple[torch.Tensor, ...]] = {}

    def _layout(self, numels: Tuple[int, ...], device: torch.device):
        key = (device, numels)
        layout = self._layouts.get(key)
        if layout is None:
            blocks = torch.tensor([math.ceil(n / BLOCK) for n in numels], dtype=torch.int64)
            first_block = torch.cumsum(blocks, 0) - blocks
            block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
            layout = tuple(t.to(device) for t in (block_tensor, first_block, torch.tensor(numels, dtype=torch.int64)))
            if len(self._layouts) >= _MAX_CACHED_LAYOUTS:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = layout
        return layout

    def __call__(self, params: List[torch.Tensor], states: List[dict], lr: float, scale: torch.Tensor,
                 found_inf: torch.Tensor, betas: Tuple[float, float], eps: float, weight_decay: float) -> None:
        """One AdamW step (torch's formula and bias corrections, decoupled weight decay) of each master with
        its weight's gradient times ``scale``; the weights receive the rounded masters and the step counts
        grow by one, except where ``found_inf`` (0-dim float32) is nonzero: then nothing changes. All on
        one GPU, ``scale`` and ``found_inf`` too."""
        global _kernel
        if _kernel is None:
            _kernel = _build_kernel()
        device = params[0].device
        block_tensor, first_block, numels = self._layout(tuple(p.numel() for p in params), device)
        addresses = [t.data_ptr() for p, s in zip(params, states)
                     for t in (p, p.grad, s["master"], s["exp_avg"], s["exp_avg_sq"], s["step"])]
        table = torch.tensor(addresses, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
        beta1, beta2 = betas
        lr_tensor = torch.full((), lr, dtype=torch.float32, device=device)
        steps = [s["step"] for s in states]
        # as torch's fused AdamW: count the step, and take it back where found_inf; a list of one tensor
        # repeated, since adding a tensor scalar to a list reads it on the host (a wait for the device)
        torch._foreach_add_(steps, 1.0)
        _kernel[(block_tensor.numel(),)](
            table, block_tensor, first_block, numels, lr_tensor, scale, found_inf, beta1, beta2,
            _log2(beta1), _log2(beta2), eps, weight_decay, BLOCK=BLOCK, num_warps=4)
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def _log2(beta: float) -> float:
    """log2 of a beta; 0 gives -inf, so that beta ** step is 0 (no bias correction), as in torch."""
    return math.log2(beta) if beta > 0 else float("-inf")
