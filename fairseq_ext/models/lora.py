"""LoRA through PEFT: ``--use-lora`` with ``--lora-config`` in ``peft.LoraConfig``'s own keys."""

import dataclasses
import functools
import json
import sys
from typing import Dict, List

import torch

from ..errors import UserInputError

# Set by the arch, not by the user: PEFT's task type and bookkeeping fields.
RESERVED_KEYS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
}


@functools.cache
def lora_keys() -> List[str]:
    """The keys of ``peft.LoraConfig`` a LORA_CONFIG may set (peft is imported on first use: runs without LoRA
    do not pay for it)."""
    from peft import LoraConfig

    return sorted(f.name for f in dataclasses.fields(LoraConfig) if f.name not in RESERVED_KEYS)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.split(",") if "," in text else text


def parse_lora_config(text: str) -> Dict:
    """Parse ``LORA_CONFIG``: a JSON object, or space-separated ``key=value`` pairs.

    In ``key=value`` form a value is read as JSON when it can be (numbers, true/false, lists) and a
    value with commas is a list of strings: ``r=16 lora_alpha=32 target_modules=q_proj,v_proj``.
    Unknown keys are a UserInputError listing ``peft.LoraConfig``'s keys.
    """
    text = (text or "").strip()
    if text.startswith("{"):
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserInputError(f"LORA_CONFIG is not valid JSON ({err.msg} at column {err.colno})") from None
    else:
        options = {}
        for pair in text.split():
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UserInputError(f"LORA_CONFIG entry {pair!r} is not key=value (e.g. r=16 lora_alpha=32)")
            options[key] = _parse_value(value)
    unknown = sorted(set(options) - set(lora_keys()))
    if unknown:
        raise UserInputError(
            f"LORA_CONFIG has unknown keys {unknown}; peft.LoraConfig accepts: {', '.join(lora_keys())}"
        )
    return options


def linear_module_names(model: torch.nn.Module) -> List[str]:
    """The distinct last name components of the model's ``nn.Linear`` modules (what target_modules matches)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    )


def apply_lora(hf_model, lora_config: str, task_type: str, adapters_in_model_dtype: bool = False):
    """Wrap ``hf_model`` in a PEFT LoRA model; only the adapters (and ``modules_to_save``) stay trainable.

    PEFT makes the adapters of a bf16 model float32 by default, and then runs their matmuls (and casts
    every adapted layer's input) in float32. With ``adapters_in_model_dtype`` they stay in the model's
    dtype, for runs whose optimizer keeps float32 master weights (PRECISION=bf16-master).
    """
    from peft import LoraConfig, get_peft_model

    options = parse_lora_config(lora_config)
    try:
        config = LoraConfig(task_type=task_type, **options)
    except (TypeError, ValueError) as err:
        raise UserInputError(f"LORA_CONFIG is not a valid peft.LoraConfig: {err}") from None
    try:
        return get_peft_model(hf_model, config, autocast_adapter_dtype=not adapters_in_model_dtype)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise UserInputError(
                f"LORA_CONFIG target_modules {options.get('target_modules')!r} match no module of the model; "
                f"its linear modules are: {', '.join(linear_module_names(hf_model))}"
            ) from None
        raise UserInputError(f"LORA_CONFIG is not valid for this model: peft says: {err}") from None


def is_lora(hf_model) -> bool:
    """Whether ``hf_model`` is a PEFT model (none can be before peft is imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(hf_model, peft.PeftModel)
