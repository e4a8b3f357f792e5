"""One Triton launch that steps many tensors: which program steps which block of which tensor, the table of
the tensors' addresses, and AdamW's step counts and bias corrections, shared by the bf16-master step
(``master_step``) and the bf16-lean step (``lean_step``).

Each program of the launch steps one block of one tensor. Which program takes which block depends on the
tensors' sizes only, so that map is built once per list of sizes and device; the addresses (gradients are
new each update) travel with each step in a pinned table copied without waiting for the device.
"""

import functools
import importlib.util
import math
from types import SimpleNamespace
from typing import Dict, List, Sequence, Tuple

import torch
from torch.distributed.tensor import DTensor

MAX_CACHED_LAYOUTS = 16  # lists of sizes (param groups, devices) whose block maps are kept


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (torch's CUDA wheels bring it; without it the steps stay unfused)."""
    return importlib.util.find_spec("triton") is not None


def fits_one_launch(weight: torch.Tensor, state: dict, state_keys: Sequence[str], state_dtype: torch.dtype) -> bool:
    """Whether a kernel over raw addresses can step ``weight``: a plain (not DTensor) bf16 weight on a GPU
    with a bf16 gradient, its states ``state_keys`` of ``state_dtype``, all contiguous, its step count on the
    GPU. (Whether Triton imports is the caller's to ask.)"""
    grad = weight.grad
    states = [state[key] for key in state_keys]
    return (
        weight.is_cuda
        and weight.dtype == torch.bfloat16
        and not isinstance(weight, DTensor)
        and grad is not None
        and grad.dtype == torch.bfloat16
        and state["step"].is_cuda
        and all(s.dtype == state_dtype for s in states)
        and all(t.is_contiguous() for t in (weight, grad, *states))
    )


@functools.lru_cache(maxsize=None)
def triton_helpers() -> SimpleNamespace:
    """Triton functions the one-launch kernels call (built on first use: Triton may not import)."""
    import triton
    import triton.language as tl

    @triton.jit
    def program_block(block_tensor, first_block, numels, BLOCK: tl.constexpr):
        """This program's tensor (its index in the table), the first element of its block, the tensor's size."""
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        start = (pid - tl.load(first_block + t)).to(tl.int64) * BLOCK
        return t, start, tl.load(numels + t)

    @triton.jit
    def adam_scalars(step_ptr, lr_ptr, log2_beta1, log2_beta2):
        """lr, lr over the first moment's bias correction, and the square root of the second's."""
        step = tl.load(step_ptr)  # the count after this step (the caller adds 1 first)
        lr = tl.load(lr_ptr)
        step_size = lr / (1.0 - tl.exp2(step * log2_beta1))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        return lr, step_size, bias_correction2_sqrt

    return SimpleNamespace(program_block=program_block, adam_scalars=adam_scalars)


class OneLaunchAdamWStep:
    """AdamW over lists of tensors in one launch per call. Subclasses name the tensors of a table row
    (``row``: the step count last) and launch their kernel (``_launch``) over ``BLOCK``-element blocks."""

    BLOCK = 1024

    def __init__(self):
        # (device, sizes) -> block -> tensor index, each tensor's first block, sizes: on that device
        self._layouts: Dict[Tuple[torch.device, Tuple[int, ...]], Tuple[torch.Tensor, ...]] = {}

    @staticmethod
    def row(param: torch.Tensor, state: dict) -> List[torch.Tensor]:
        """The tensors whose addresses make ``param``'s row of the table, its step count last."""
        raise NotImplementedError

    def _launch(
        self,
        grid: int,
        table: torch.Tensor,
        layout: Tuple[torch.Tensor, ...],
        lr: torch.Tensor,
        scale: torch.Tensor,
        found_inf: torch.Tensor,
        betas: Tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        raise NotImplementedError

    def _layout(self, numels: Tuple[int, ...], device: torch.device) -> Tuple[torch.Tensor, ...]:
        key = (device, numels)
        layout = self._layouts.get(key)
        if layout is None:
            blocks = torch.tensor([math.ceil(n / self.BLOCK) for n in numels], dtype=torch.int64)
            first_block = torch.cumsum(blocks, 0) - blocks
            block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
            layout = tuple(t.to(device) for t in (block_tensor, first_block, torch.tensor(numels, dtype=torch.int64)))
            if len(self._layouts) >= MAX_CACHED_LAYOUTS:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = layout
        return layout

    def __call__(
        self,
        params: List[torch.Tensor],
        states: List[dict],
        lr: float,
        scale: torch.Tensor,
        found_inf: torch.Tensor,
        betas: Tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        """One AdamW step (torch's formula and bias corrections, decoupled weight decay) of each weight with
        its gradient times ``scale``; the step counts grow by one, except where ``found_inf`` (0-dim float32)
        is nonzero: then nothing changes. All on one GPU, ``scale`` and ``found_inf`` too."""
        device = params[0].device
        layout = self._layout(tuple(p.numel() for p in params), device)
        addresses = [t.data_ptr() for p, s in zip(params, states) for t in self.row(p, s)]
        table = torch.tensor(addresses, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
        lr_tensor = torch.full((), lr, dtype=torch.float32, device=device)
        steps = [s["step"] for s in states]
        # as torch's fused AdamW: count the step, and take it back where found_inf; a list of one tensor
        # repeated, since adding a tensor scalar to a list reads it on the host (a wait for the device)
        torch._foreach_add_(steps, 1.0)
        self._launch(layout[0].numel(), table, layout, lr_tensor, scale, found_inf, betas, eps, weight_decay)
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def log2_beta(beta: float) -> float:
    """log2 of a beta; 0 gives -inf, so that beta ** step is 0 (no bias correction), as in torch."""
    return math.log2(beta) if beta > 0 else float("-inf")
