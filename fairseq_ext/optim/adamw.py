"""``--optimizer torch_adamw``: PyTorch's AdamW (fused kernels on GPUs) for fp32 and bf16 weights.

fairseq's own ``adam`` steps parameters one by one in Python unless apex is installed (it is not on
the package registry). This optimizer steps them with torch's fused AdamW kernel on GPUs (the
multi-tensor ``foreach`` path on CPUs), and keeps weights and states in one of three ways, set by
the parameters' dtype (the run's PRECISION) and ``lean_states``:

============  ============================  ========================================  ===============
PRECISION     model weights and gradients   held by the optimizer                     bytes / param
============  ============================  ========================================  ===============
fp32, bf16    float32                       float32 moments                           16
bf16-master   bfloat16                      float32 master weights and moments        16
bf16-lean     bfloat16                      bfloat16 moments; no master weights       8
============  ============================  ========================================  ===============

With master weights the update is applied to the float32 copy, which is then rounded to the bf16
weight, so updates smaller than bf16's resolution still accumulate. On GPUs one Triton kernel steps all
of them (``master_step``); elsewhere the gradients are cast to float32 for torch's fused step and the
masters copied back. Without (bf16-lean) the update is computed in float32 and rounded *stochastically*
to bf16: unbiased, so small updates are kept on average instead of being rounded away; on GPUs one Triton
kernel steps all of them too (``lean_step``), elsewhere float32 passes chunk by chunk. That halves the
memory of a full finetune (an 8B model's weights, gradients and states fit in 64 GB).
"""

from typing import Dict, List

import torch
from torch.optim.adamw import adamw as functional_adamw

from .lean_step import LeanAdamWStep, takes_fused_lean_step
from .master_step import MasterAdamWStep, takes_fused_master_step

STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")
LEAN_CHUNK = 1 << 24  # elements stepped at once by the lean path (bounds its float32 temporaries)
MASTER_CHUNK_ELEMENTS = 1 << 26  # bf16 weights with master weights: gradients cast to float32 this many at a time


def stochastic_round_to_bf16(value: torch.Tensor, generator: torch.Generator = None) -> torch.Tensor:
    """Round float32 ``value`` to bfloat16 up or down at random, with the probability that makes the
    result's expectation equal ``value`` (the lower 16 bits of the float32 decide)."""
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, device=value.device, dtype=torch.int32, generator=generator)
    rounded = (bits + noise) & -65536  # carry into bf16's last bit with probability low16 / 2**16
    return rounded.view(torch.float32).to(torch.bfloat16)


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay; float32 master weights for low-precision parameters, or
    bf16 moments with stochastic rounding (``lean_states``). See the module docstring."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lean_states: bool = False,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lean_states=lean_states)
        super().__init__(params, defaults)
        self._generators = {}
        self._one_launch_steps = {}  # the kernels' callers, by class, made on first use

    def _init_state(self, param: torch.Tensor, lean: bool) -> dict:
        state = self.state[param]
        if not state:
            keeps_master = param.dtype != torch.float32 and not lean
            target = param.detach().float() if keeps_master else param
            # beside the weight: the fused kernels read and count it there, without the host
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(target, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(target, memory_format=torch.preserve_format)
            if keeps_master:
                state["master"] = target
        elif lean and "master" not in state and state["exp_avg"].dtype != param.dtype:
            # loaded by a path that kept the checkpoint's float32 (ZeroRedundancyOptimizer's): lean again
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].to(param.dtype)
        if state["step"].device != param.device:  # as loaded by ZeroRedundancyOptimizer: on the host
            state["step"] = state["step"].to(param.device)
        return state

    @torch.no_grad()
    def step(self, closure=None, grad_scale=None, found_inf=None):
        """One AdamW step. ``grad_scale`` (a float or a 0-dim tensor) multiplies every gradient first:
        fairseq's normalization and gradient clipping folded into the update instead of passes over
        the gradients of their own. ``found_inf`` (a 0-dim float32 tensor on the parameters' device):
        where it is 1 the step changes nothing (weights, moments, step counts), decided on the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.step_parameters(group, [p for p in group["params"] if p.grad is not None], grad_scale, found_inf)
        return loss

    @torch.no_grad()
    def step_parameters(self, group: dict, params: List[torch.Tensor], grad_scale=None, found_inf=None) -> None:
        """One AdamW step of ``params`` (of ``group``, each with a gradient), as :meth:`step` takes it for all:
        the step inside the backward (``in_backward.py``) takes it a layer at a time."""
        dense, master_params, lean_params = [], [], []
        for param in params:
            if param.grad.is_sparse:
                raise RuntimeError("torch_adamw does not support sparse gradients")
            state = self._init_state(param, group["lean_states"])
            if param.dtype == torch.float32:
                dense.append(param)
            elif "master" in state:
                master_params.append(param)
            else:
                lean_params.append(param)
        self._adamw(dense, [p.grad for p in dense], [self.state[p] for p in dense], group, grad_scale, found_inf)
        fused, chunked = [], []
        for param in master_params:
            (fused if takes_fused_master_step(param, self.state[param]) else chunked).append(param)
        self._one_launch(MasterAdamWStep, fused, group, grad_scale, found_inf)
        fused_lean, unfused_lean = [], []
        for param in lean_params:
            (fused_lean if takes_fused_lean_step(param, self.state[param]) else unfused_lean).append(param)
        self._one_launch(LeanAdamWStep, fused_lean, group, grad_scale, found_inf)
        for param in unfused_lean:
            self._lean_step(param, self.state[param], group, grad_scale, found_inf)
        for chunk in _chunks(chunked, MASTER_CHUNK_ELEMENTS):
            # float32 copies of one chunk's gradients at a time: at most MASTER_CHUNK_ELEMENTS x 4 bytes more;
            # one multi-tensor copy casts them (a cast per tensor costs a kernel launch each: LoRA has hundreds)
            masters = [self.state[p]["master"] for p in chunk]
            grads = [torch.empty_like(master) for master in masters]
            torch._foreach_copy_(grads, [p.grad for p in chunk])
            self._adamw(masters, grads, [self.state[p] for p in chunk], group, grad_scale, found_inf)
            torch._foreach_copy_(chunk, masters)

    def _one_launch(self, step_class, params: List[torch.Tensor], group: dict, grad_scale=None, found_inf=None) -> None:
        """bf16 weights on a GPU stepped by one Triton launch per device (``step_class``: ``MasterAdamWStep``
        for float32 masters, ``LeanAdamWStep`` for bf16 moments), instead of passes over memory per weight."""
        if not params:
            return
        if step_class not in self._one_launch_steps:
            self._one_launch_steps[step_class] = step_class()
        by_device: Dict[torch.device, List[torch.Tensor]] = {}
        for param in params:
            by_device.setdefault(param.device, []).append(param)
        for device, on_device in by_device.items():
            scale = _device_scalar(1.0 if grad_scale is None else grad_scale, device)
            skip = (
                found_inf.to(device) if found_inf is not None else torch.zeros((), dtype=torch.float32, device=device)
            )
            self._one_launch_steps[step_class](
                on_device,
                [self.state[p] for p in on_device],
                group["lr"],
                scale,
                skip,
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )

    @staticmethod
    def _adamw(
        params: List[torch.Tensor],
        grads: List[torch.Tensor],
        states: List[dict],
        group: dict,
        grad_scale=None,
        found_inf=None,
    ) -> None:
        if not params:
            return
        on_gpu = params[0].is_cuda
        fused = on_gpu or found_inf is not None  # torch's fused kernels (GPU and CPU) read found_inf; foreach does not
        divide_by = None
        if grad_scale is not None:
            if fused:  # the fused kernel divides the gradients by its ``grad_scale`` as it reads them
                divide_by = _device_scalar(grad_scale, params[0].device).reciprocal()
            else:
                torch._foreach_mul_(grads, grad_scale)
        beta1, beta2 = group["betas"]
        functional_adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=not fused,
            fused=fused or None,
            grad_scale=divide_by,
            found_inf=found_inf,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _lean_step(self, param: torch.Tensor, state: dict, group: dict, grad_scale=None, found_inf=None) -> None:
        """One AdamW step of a bf16 weight with bf16 moments where the kernel does not run (CPUs, no Triton,
        DTensors): float32 arithmetic chunk by chunk, the moments rounded to nearest, the weight
        stochastically; nothing changes where ``found_inf`` is 1."""
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        step = state["step"]
        step += 1
        # bias corrections as tensors beside the count: reading it on the host would wait for the device
        step_size = lr / (1 - beta1**step)
        denom_scale = (1 - beta2**step).rsqrt()
        skip = None if found_inf is None else found_inf.to(param.device).bool()
        generator = self._generator(param.device)
        flat = [t.view(-1) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
        for start in range(0, param.numel(), LEAN_CHUNK):
            weight, grad, exp_avg, exp_avg_sq = (t[start : start + LEAN_CHUNK] for t in flat)
            grad32 = grad.float() if grad_scale is None else grad.float().mul_(grad_scale)
            avg = exp_avg.float().lerp_(grad32, 1 - beta1)
            avg_sq = exp_avg_sq.float().mul_(beta2).addcmul_(grad32, grad32, value=1 - beta2)
            exp_avg.copy_(_unless(skip, exp_avg, avg))
            exp_avg_sq.copy_(_unless(skip, exp_avg_sq, avg_sq))
            weight32 = weight.float().mul_(1 - lr * decay)
            weight32.sub_(avg.div_(avg_sq.sqrt_().mul_(denom_scale).add_(eps)).mul_(step_size))
            weight.copy_(_unless(skip, weight, stochastic_round_to_bf16(weight32, generator)))
        if found_inf is not None:
            step -= found_inf.to(step.device)

    def _generator(self, device: torch.device) -> torch.Generator:
        """A generator of this optimizer's own per device, so rounding leaves the run's random streams alone."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
            self._generators[device].manual_seed(0x5EED)
        return self._generators[device]

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads states in the dtypes and places this optimizer keeps, whatever the checkpoint holds (fairseq
        saves bf16 tensors as float32 and everything on the CPU; torch casts loaded states to their
        parameter's dtype): float32 master weights and moments beside them, the parameter's dtype for lean
        moments, step counts on the weight's device."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint of torchao's low-bit AdamW (low_bit.py) lacks lean_states
            group.setdefault("lean_states", self.defaults["lean_states"])
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved, state = state_dict["state"].get(saved_id, {}), self.state[param]
            if "step" in state:  # checkpoints hold it on the CPU; the fused kernels want it beside the weight
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
            if "master" in saved:
                for key in STATE_KEYS:
                    state[key] = saved[key].to(device=param.device, dtype=torch.float32, copy=True)


def _unless(skip, kept: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new``, or ``kept`` where ``skip`` (a 0-dim bool tensor) is set; ``new`` when ``skip`` is None."""
    return new if skip is None else torch.where(skip, kept, new)


def _device_scalar(value, device: torch.device) -> torch.Tensor:
    """A number or 0-dim tensor as a 0-dim float32 tensor on ``device``; a number by a fill on the device
    (a copy from the host would wait for the device)."""
    if torch.is_tensor(value):
        return value.to(device, torch.float32)
    return torch.full((), value, dtype=torch.float32, device=device)


def _chunks(params: List[torch.Tensor], max_elements: int) -> List[List[torch.Tensor]]:
    """``params`` in consecutive groups of at most ``max_elements`` elements (a larger tensor alone)."""
    chunks, current, size = [], [], 0
    for param in params:
        if current and size + param.numel() > max_elements:
            chunks.append(current)
            current, size = [], 0
        current.append(param)
        size += param.numel()
    if current:
        chunks.append(current)
    return chunks
