"""Your own module types in the cube: how they split under tensor parallel, or that they stay whole.

The runtime shards a Hugging Face model by its config's ``base_model_tp_plan`` (module-name patterns ->
``colwise`` / ``rowwise``). A module of your own (a custom attention, a fused projection) may not fit
those patterns: register its class, from your ``--user-dir``, with rules relative to the module, or
with none to keep it whole (replicated on every tensor-parallel rank, nothing inside it sharded)::

    from fairseq_ext.cube.custom import register_module

    register_module("FusedQKVAttention")                          # stays whole
    register_module(MyMLP, tp_rules={"up": "colwise", "down": "rowwise"})
"""

from typing import Dict, Optional, Union

from ..errors import UserInputError

# colwise_qkv: colwise for one projection that packs q, k and v side by side (each rank takes its heads of all three)
STYLES = ("colwise", "rowwise", "colwise_qkv")
CUSTOM_MODULES: Dict[str, Dict[str, str]] = {}  # class name -> child-name pattern -> style ({}: whole)


def register_module(module_class: Union[type, str], tp_rules: Optional[Dict[str, str]] = None) -> None:
    """Tell the cube how modules of ``module_class`` (a class or its name) split under tensor parallel.

    Args:
        module_class: the module's class, or its class name.
        tp_rules: ``{child name pattern: "colwise" | "rowwise" | "colwise_qkv"}`` relative to the module
            (``fnmatch`` patterns, e.g. ``"experts.*.up"``; the children are ``nn.Linear`` or transformers'
            ``Conv1D``); ``None`` or ``{}``: the module stays whole.
    """
    name = module_class if isinstance(module_class, str) else module_class.__name__
    rules = dict(tp_rules or {})
    unknown = sorted({style for style in rules.values() if style not in STYLES})
    if unknown:
        raise UserInputError(
            f"register_module({name}): tensor-parallel styles {unknown} are not supported; use {', '.join(STYLES)}"
        )
    CUSTOM_MODULES[name] = rules


def registered_rules(class_name: str) -> Optional[Dict[str, str]]:
    """The rules registered for ``class_name`` ({} for a module that stays whole), or None."""
    return CUSTOM_MODULES.get(class_name)
