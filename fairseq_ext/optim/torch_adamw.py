"""``--optimizer torch_adamw`` for fairseq: :class:`MixedPrecisionAdamW`, driven by fairseq's LR schedulers."""

import ast
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, List

from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from .adamw import MixedPrecisionAdamW


@dataclass
class TorchAdamWConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for AdamW"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    precision: str = II("task.precision")  # bf16-lean keeps bf16 moments (the task's --precision)
    lr: List[float] = II("optimization.lr")


@register_optimizer("torch_adamw", dataclass=TorchAdamWConfig)
class FairseqTorchAdamW(FairseqOptimizer):
    """PyTorch's AdamW (fused on GPUs) with float32 master weights for bf16 models, or bf16 states
    with stochastic rounding under ``--precision bf16-lean`` (see ``fairseq_ext/optim/adamw.py``)."""

    def __init__(self, cfg: TorchAdamWConfig, params):
        super().__init__(cfg)
        self._optimizer = MixedPrecisionAdamW(params, **self.optimizer_config)

    @property
    def optimizer_config(self) -> dict:
        """The settings a checkpoint's optimizer state is overridden with on resume (fairseq's convention)."""
        betas = self.cfg.adam_betas
        if isinstance(betas, str):
            betas = ast.literal_eval(betas)  # fairseq passes "(0.9, 0.95)" as text
        elif OmegaConf.is_config(betas):
            betas = OmegaConf.to_container(betas)
        return {"lr": self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr,
                "betas": tuple(betas), "eps": self.cfg.adam_eps, "weight_decay": self.cfg.weight_decay,
                "lean_states": getattr(self.cfg, "precision", "fp32") == "bf16-lean"}

    @property
    def supports_flat_params(self) -> bool:
        return True
