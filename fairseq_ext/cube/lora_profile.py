"""LoRA in the compile pass: the adapters run.sh's ``LORA_CONFIG`` adds, their parameters under tensor
parallel, and a module profile with only the adapters training."""

from dataclasses import dataclass, replace
from typing import Dict, Tuple

import torch

from ..errors import UserInputError
from .profile_types import ModuleProfile


@dataclass(frozen=True)
class Lora:
    """LoRA adapters (run.sh ``USE_LORA=1``): their rank and the projection names ``target_modules`` lists.

    Only the adapters train: the base weights need no gradients or optimizer states, and their backward
    computes input gradients only (half a full finetune's backward FLOPs)."""

    rank: int
    targets: Tuple[str, ...]  # last name components of the adapted projections, or ("all-linear",)

    @classmethod
    def from_config(cls, lora_config: str, model_type: str) -> "Lora":
        """The adapters run.sh's ``LORA_CONFIG`` gives a model of ``model_type``, with peft's defaults (rank 8,
        its target modules for the family) where it names none."""
        from peft import LoraConfig
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

        from ..models.lora import parse_lora_config

        options = parse_lora_config(lora_config)
        targets = options.get("target_modules") or DEFAULT_TARGETS.get(model_type)
        if not targets:
            raise UserInputError(
                f"LORA_CONFIG names no target_modules and peft has no default for {model_type!r}; "
                "add target_modules=... (e.g. q_proj,v_proj)"
            )
        return cls(
            rank=int(options.get("r", LoraConfig.r)), targets=tuple([targets] if isinstance(targets, str) else targets)
        )


def lora_split(model, styles: Dict[str, str], lora: Lora) -> Tuple[int, int]:
    """(adapter elements of one decoder layer, of which tp splits) for LoRA on ``lora.targets``: r x (in + out)
    per adapted projection; tp splits B of a colwise projection and A of a rowwise one (as
    ``runtime/tensor_parallel.py`` does); ``styles``: module name -> tensor-parallel style (``model_spec``)."""
    numel = sharded = 0
    for name, module in model.base_model.layers[0].named_modules():
        if not isinstance(module, torch.nn.Linear) or not ({name.rsplit(".", 1)[-1], "all-linear"} & set(lora.targets)):
            continue
        out_features, in_features = module.weight.shape
        numel += lora.rank * (in_features + out_features)
        style = styles.get(f"layers.0.{name}")
        sharded += lora.rank * (out_features if style == "colwise" else in_features if style == "rowwise" else 0)
    if not numel:
        raise UserInputError(
            f"LoRA target_modules {list(lora.targets)} name no linear projection of the decoder "
            "layers; the compile pass plans LoRA on them only"
        )
    return numel, sharded


def with_lora(module: ModuleProfile, adapters: Tuple[int, int], tp: int) -> ModuleProfile:
    """``module`` with its base weights frozen and, for the decoder layers, LoRA's adapters training. A frozen
    module's backward computes its input's gradient only (one forward's FLOPs; none for the embedding), but
    the attention core's backward still takes twice its forward (the gradients of queries, keys and values)."""
    frozen_backward = module.fwd_flops_per_token + module.attention_flops_per_token
    if module.name != "layers":
        backward = 0.0 if module.name == "embed" else frozen_backward
        return replace(module, trainable=(0, 0), bwd_flops_per_token=backward)
    numel, sharded = adapters
    module = replace(
        module,
        param_numel=module.param_numel + numel,
        sharded_numel=module.sharded_numel + sharded,
        trainable=(numel, sharded),
    )
    adapter_flops = 2.0 * module.local_trainable(tp)  # a multiply-add per adapter weight on this rank
    return replace(
        module,
        fwd_flops_per_token=module.fwd_flops_per_token + adapter_flops,
        bwd_flops_per_token=frozen_backward + 2 * adapter_flops,
    )
