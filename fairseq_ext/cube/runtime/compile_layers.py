"""``torch.compile`` of a model's repeated blocks (regional compilation).

Compiling each decoder layer instead of the whole model fuses the layer's elementwise work (norms,
rotary embeddings, activations, residual adds) into few kernels, while compilation stays short: the
layers share their code, so one compiled graph serves them all. The loss, the embeddings and fairseq's
loop stay eager.
"""

import torch

from ...errors import UserInputError


def repeated_block_classes(model: torch.nn.Module) -> set:
    """Class names of the model's repeated blocks: Hugging Face's ``_no_split_modules`` (e.g. LlamaDecoderLayer)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def compile_layers(model: torch.nn.Module) -> int:
    """Compile, in place, every submodule whose class is one of the model's repeated blocks; return how many.

    Raises:
        UserInputError: the model names no repeated blocks (a model that is not a Hugging Face transformer).
    """
    classes = repeated_block_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise UserInputError(f"COMPILE=1 compiles the decoder layers, and {type(model).__name__} names none "
                             f"(no _no_split_modules); set COMPILE=0")
    for layer in layers:
        layer.compile()
    return len(layers)
