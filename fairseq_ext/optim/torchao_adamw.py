"""torchao's low-bit AdamW (``OPTIMIZER_STATES=8bit`` / ``4bit``, see ``low_bit.py``) as fairseq's torch_adamw
drives it: the gradient factor of the step, learning rates as fairseq sets them, and checkpoints that hold plain
float32 moments (loadable without torchao's classes, into any OPTIMIZER_STATES). Importing this module imports
torchao; ``low_bit.torchao_adamw`` says what to install when it is missing."""

from typing import Dict, List

import torch
from torchao.optim import AdamW4bit, AdamW8bit

from .low_bit import LOW_BIT

MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # state key, signed quantization map


class _FairseqLowBit:
    """What fairseq's torch_adamw needs of torchao's low-bit AdamW, over its class (the next in the MRO)."""

    def __init__(self, params, states: str, lr: float, betas, eps: float, weight_decay: float):
        block_size = LOW_BIT[states].block_size
        super().__init__(
            params,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            block_size=block_size,
            bf16_stochastic_round=True,  # only where the weight is bf16
        )
        self.states = states
        for group in self.param_groups:  # torchao keeps the rate as a tensor; fairseq's set_lr writes numbers
            group["lr"] = lr

    @torch.no_grad()
    def step(self, closure=None, grad_scale=None):
        """torchao's step after the gradients are multiplied by ``grad_scale`` (a number or a 0-dim tensor:
        fairseq's 1/sample-size factor and the clip coefficient), in one multi-tensor pass per device and dtype."""
        if grad_scale is not None:
            groups: Dict[tuple, List[torch.Tensor]] = {}
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        groups.setdefault((param.grad.device, param.grad.dtype), []).append(param.grad)
            for (device, _), grads in groups.items():
                factor = grad_scale.to(device) if torch.is_tensor(grad_scale) else grad_scale
                torch._foreach_mul_(grads, factor)
        rates = [group["lr"] for group in self.param_groups]
        for group, rate in zip(self.param_groups, rates):
            group["lr"] = torch.tensor(float(rate), dtype=torch.float32)  # on the host: torchao's convention
        try:
            return super().step(closure)
        finally:
            for group, rate in zip(self.param_groups, rates):
                group["lr"] = rate

    def state_dict(self) -> dict:
        """torch's state_dict with each quantized moment as a plain float32 tensor on the host, one at a time
        (a checkpoint holds no torchao class and loads into bf16-lean's or this optimizer alike)."""
        state_dict = super().state_dict()
        for state in state_dict["state"].values():
            for key, _ in MOMENTS:
                if key in state:
                    value = state[key]
                    plain = value if type(value) is torch.Tensor else value.dequantize()  # torchao's: quantized
                    state[key] = plain.float().cpu()
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads step counts and settings as torch does, and each moment quantized into this optimizer's
        states one at a time (never all of them unquantized on the device)."""
        moments = {
            saved_id: {key: state[key] for key, _ in MOMENTS if key in state}
            for saved_id, state in state_dict["state"].items()
        }
        rest = {
            "state": {
                i: {k: v for k, v in state.items() if k not in moments[i]} for i, state in state_dict["state"].items()
            },
            "param_groups": state_dict["param_groups"],
        }
        super().load_state_dict(rest)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, signed in MOMENTS:
                if key in moments.get(saved_id, {}):
                    buffer = self._new_buffer(param, signed)
                    buffer.copy_(moments[saved_id][key].to(param.device, torch.float32))
                    self.state[param][key] = buffer
        for group in self.param_groups:  # a checkpoint of bf16-lean's optimizer lacks torchao's settings (amsgrad)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group["lr"] = float(group["lr"])


class _AdamW8bit(_FairseqLowBit, AdamW8bit):
    pass


class _AdamW4bit(_FairseqLowBit, AdamW4bit):
    pass


def low_bit_adamw(params, states: str, lr: float, betas, eps: float, weight_decay: float) -> torch.optim.Optimizer:
    """torchao's AdamW8bit or AdamW4bit (``states``) for fairseq, bf16 weights rounded stochastically."""
    cls = {"8bit": _AdamW8bit, "4bit": _AdamW4bit}[states]
    return cls(params, states, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
