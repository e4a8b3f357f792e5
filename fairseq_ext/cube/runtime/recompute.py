"""Recompute (activation checkpointing): modules named by class keep no activations for backward.

``RECOMPUTE_MODULE_NAMES=LlamaDecoderLayer`` wraps every module of that class with PyTorch's
non-reentrant checkpoint wrapper: its forward runs again during backward instead of keeping its
intermediate activations, trading compute for memory. Results are unchanged.
"""

from typing import Iterable, List

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    _CHECKPOINT_PREFIX,
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from ...errors import UserInputError


def module_class_names(model: torch.nn.Module) -> List[str]:
    """The distinct class names of ``model``'s submodules, sorted."""
    return sorted({type(module).__name__ for module in model.modules()})


def state_dict_name(parameter_name: str) -> str:
    """The state_dict key of a parameter: the checkpoint wrapper's prefix removed, as its state_dict hook does."""
    return parameter_name.replace(_CHECKPOINT_PREFIX, "")


def parse_module_names(text: str) -> List[str]:
    """``"TypeA,TypeB"`` (commas or spaces) -> ``["TypeA", "TypeB"]``."""
    return [name for name in text.replace(",", " ").split() if name]


def apply_recompute(model: torch.nn.Module, class_names: Iterable[str]) -> int:
    """Wrap every submodule whose class name is in ``class_names``; return how many were wrapped.

    Raises:
        UserInputError: a name that is no class of the model, listing the class names it has.
    """
    names = set(class_names)
    if not names:
        return 0
    present = module_class_names(model)
    unknown = sorted(names - set(present))
    if unknown:
        raise UserInputError(
            f"RECOMPUTE_MODULE_NAMES {', '.join(unknown)}: no module of the model has that class; "
            f"its module classes are: {', '.join(present)}"
        )
    targets = [m for m in model.modules() if type(m).__name__ in names]
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: type(m).__name__ in names,
    )
    return len(targets)
