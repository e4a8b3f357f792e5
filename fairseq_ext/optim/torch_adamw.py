"""``--optimizer torch_adamw`` for fairseq: :class:`MixedPrecisionAdamW`, driven by fairseq's LR schedulers."""

import ast
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from ..cube.runtime.precision import stored_as
from .adamw import MixedPrecisionAdamW
from .in_backward import OptimizerInBackward
from .low_bit import PRECISION_STATES, is_low_bit, torchao_adamw


@dataclass
class TorchAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for AdamW"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    precision: str = II("task.precision")  # bf16-lean keeps bf16 moments (the task's --precision)
    optimizer_states: str = II("task.optimizer_states")  # 8bit / 4bit: torchao's quantized moments (low_bit.py)
    lr: List[float] = II("optimization.lr")


@register_optimizer("torch_adamw", dataclass=TorchAdamWConfig)
class FairseqTorchAdamW(FairseqOptimizer):
    """PyTorch's AdamW (fused on GPUs) with float32 master weights for bf16 models, or bf16 states
    with stochastic rounding under ``--precision bf16-lean`` (see ``fairseq_ext/optim/adamw.py``); with
    ``--optimizer-states 8bit`` / ``4bit``, torchao's low-bit AdamW (``low_bit.py``)."""

    def __init__(self, cfg: TorchAdamWConfig, params):
        super().__init__(cfg)
        self.low_bit = is_low_bit(getattr(cfg, "optimizer_states", None) or PRECISION_STATES)
        if self.low_bit:
            self._optimizer = torchao_adamw(params, cfg.optimizer_states, **self.optimizer_config)
        else:
            self._optimizer = MixedPrecisionAdamW(params, **self.optimizer_config)
        self._grad_multiplier = 1.0  # pending factor of the gradients, applied by the next step
        self._found_inf = None  # 1 on the device when the next step is to change nothing
        self.in_backward = None  # an OptimizerInBackward once step_in_backward() is called

    def step_in_backward(self, step_groups=()) -> OptimizerInBackward:
        """From now on each weight is stepped inside the backward, as its gradient is final (``in_backward.py``),
        the weights of each of ``step_groups`` (lists of them: a layer's) together once all are final;
        :meth:`multiply_grads`, :meth:`clip_grad_norm` and :meth:`step` then find the update done."""
        if self.low_bit:
            raise RuntimeError("low-bit optimizer states step after the backward (refused before training)")
        if self.in_backward is None:
            self.in_backward = OptimizerInBackward(self._optimizer, step_groups)
        return self.in_backward

    def multiply_grads(self, c) -> None:
        """Replaces fairseq's pass over every gradient (normalization by the sample size): the factor is
        kept and applied inside the optimizer step (inside the backward: applied already)."""
        if self.in_backward is not None:
            self.in_backward.check_factor(c)
            return
        self._grad_multiplier = self._grad_multiplier * c

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        """fairseq's clipping (the norm of all gradients, scaled to at most ``max_norm``) without touching
        the gradients: the norm includes the pending factor, and the clip coefficient joins it. With the step
        inside the backward: the norm its hooks gathered (clipping is refused there, ``model_spec.py``)."""
        if self.in_backward is not None:
            assert not max_norm > 0, "the optimizer step inside the backward cannot clip (refused before training)"
            norm = self.in_backward.grad_norm()
            if norm is None:
                return torch.zeros(())
            return aggregate_norm_fn(norm) if aggregate_norm_fn is not None else norm
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.linalg.vector_norm(torch.stack(_norms(grads)))
        if aggregate_norm_fn is not None:
            norm = aggregate_norm_fn(norm)
        return self.clip_by_norm(norm, max_norm)

    def clip_by_norm(self, norm: torch.Tensor, max_norm: float) -> torch.Tensor:
        """fairseq's clipping given ``norm``, the norm of the gradients as they are (of a model split over
        processes: summed over the splits), without touching them: returns the norm with the pending factor,
        and the clip coefficient joins the factor."""
        total_norm = norm * self._grad_multiplier
        if max_norm > 0:
            self._grad_multiplier = self._grad_multiplier * (max_norm / (total_norm + 1e-6)).clamp_(max=1)
        return total_norm

    def skip_step_if_nonfinite(self, norm: torch.Tensor) -> bool:
        """Make the next step change nothing where ``norm`` (on the device) is not finite, decided on the device,
        so the host need not wait for the gradients before launching the step. Every step of torch_adamw can but
        torchao's low-bit one (returns False: fairseq checks the norm before the step, as for other optimizers)."""
        if self.low_bit:
            return False
        self._found_inf = torch.logical_not(torch.isfinite(norm)).to(torch.float32)
        return True

    def step(self, closure=None, scale=1.0, groups=None):
        """The optimizer step, with the pending gradient factor (and fairseq's ``scale``) folded into it."""
        if groups is not None:
            raise ValueError("torch_adamw steps all parameter groups together")
        if self.in_backward is not None:  # every weight was stepped in the backward
            self._grad_multiplier, self._found_inf = 1.0, None
            return
        multiplier, self._grad_multiplier = self._grad_multiplier / scale, 1.0
        found_inf, self._found_inf = self._found_inf, None
        scales = torch.is_tensor(multiplier) or multiplier != 1.0
        if self.low_bit:
            self.optimizer.step(closure, grad_scale=multiplier if scales else None)
            return
        self.optimizer.step(closure, grad_scale=multiplier if scales else None, found_inf=found_inf)

    def zero_grad(self) -> None:
        super().zero_grad()
        self._grad_multiplier = 1.0
        self._found_inf = None

    @property
    def optimizer_config(self) -> dict:
        """The settings a checkpoint's optimizer state is overridden with on resume (fairseq's convention)."""
        betas = self.cfg.adam_betas
        if isinstance(betas, str):
            betas = ast.literal_eval(betas)  # fairseq passes "(0.9, 0.95)" as text
        elif OmegaConf.is_config(betas):
            betas = OmegaConf.to_container(betas)
        config = {
            "lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
            "betas": tuple(betas),
            "eps": self.cfg.adam_eps,
            "weight_decay": self.cfg.weight_decay,
        }
        if not self.low_bit:
            config["lean_states"] = stored_as(getattr(self.cfg, "precision", "fp32")) == "bf16-lean"
        return config

    @property
    def supports_flat_params(self) -> bool:
        return True


def _norms(grads: List[torch.Tensor]) -> List[torch.Tensor]:
    """The float32 2-norms of the gradients (in no particular order): one multi-tensor kernel per device and
    dtype (a norm per tensor costs a launch each)."""
    groups = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    return [norm for group in groups.values() for norm in torch._foreach_norm(group, 2, dtype=torch.float32)]
