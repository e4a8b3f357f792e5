"""PRECISION=fp8 / fp8-lean: the decoder blocks' linear layers multiply in float8 (torchao's float8 training,
dynamic scales of one of :data:`RECIPES`, tensorwise by default), everything else as bf16-master (bf16 weights and gradients, float32 master weights
and moments in the optimizer) / bf16-lean. The weights stay bf16 ``nn.Parameter``s under the same names, so
checkpoints and exports are bf16-master's / bf16-lean's.

Which linear layers convert (:func:`converts`, also what the compile pass costs at the float8 rate): those of
the repeated blocks (``_no_split_modules``), never LoRA's adapters (rank-wide, all cast and no matmul), never
the LM head or embeddings (outside the blocks), with both dimensions divisible by 16 (the float8 matmul's
requirement), and not the narrow ones whose casts cost more than the faster matmul saves (input width at most
4096 and output at most 1024: an 8B model's k/v projections; torchao's own threshold for tensorwise scaling), nor
those whose input and output are both at most ``min_width`` wide (``--float8-min-width``; 0 by default: every
square projection converts; leaving a 1.1B model's 2048-wide q/o projections in bf16 measured 1.2% fewer tokens/s
on an H100, benchmarks/results/single_gpu_speed run 28).
"""

from typing import Iterator, Tuple

import torch

from ...errors import UserInputError
from .precision import stored_as

INSTALL = "pip install torchao==0.18.0"
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm89), Hopper (sm90) and newer
NARROW_IN, NARROW_OUT = 4096, 1024  # at most this wide in and out: the casts cost more than float8 saves
MIN_WIDTH = 0  # --float8-min-width's default: layers at most this wide in and out stay bf16
# --float8-recipe: torchao's tensorwise scales (cuBLAS float8 matmul, fast accumulation in the forward's matmul
# only); the same with fast accumulation in the backward's two matmuls too (1.1B full FT on an H100: +2.3% tokens/s,
# the gradients accumulated at the tensor cores' lower precision; benchmarks/results/single_gpu_speed run 28)
RECIPES = ("tensorwise", "tensorwise-fast-accum")


def converts(name: str, in_features: int, out_features: int, min_width: int = MIN_WIDTH) -> bool:
    """Whether the linear layer ``name`` (its path inside a decoder block) multiplies in float8."""
    if any(part.startswith("lora_") for part in name.split(".")):
        return False
    if in_features % 16 or out_features % 16:
        return False
    if in_features <= min_width and out_features <= min_width:
        return False
    return not (in_features <= NARROW_IN and out_features <= NARROW_OUT)


def llama_linears(hidden: int, heads: int, kv_heads: int, intermediate: int) -> Iterator[Tuple[str, int, int]]:
    """(name, in, out) of a Llama-style decoder layer's linear layers."""
    head_dim = hidden // heads
    yield from (
        ("self_attn.q_proj", hidden, heads * head_dim),
        ("self_attn.k_proj", hidden, kv_heads * head_dim),
        ("self_attn.v_proj", hidden, kv_heads * head_dim),
        ("self_attn.o_proj", heads * head_dim, hidden),
        ("mlp.gate_proj", hidden, intermediate),
        ("mlp.up_proj", hidden, intermediate),
        ("mlp.down_proj", intermediate, hidden),
    )


def float8_flops_per_token(hidden: int, heads: int, kv_heads: int, intermediate: int) -> float:
    """Forward FLOPs per token of one Llama-style decoder layer's linear layers that :func:`converts`."""
    return sum(
        2.0 * i * o for name, i, o in llama_linears(hidden, heads, kv_heads, intermediate) if converts(name, i, o)
    )


def kept_bytes_saved_per_token(hidden: int, intermediate: int) -> float:
    """Bytes per token a compiled Llama-style decoder layer with float8 linear layers keeps less for the backward
    of a full finetune: Inductor keeps float8 casts of inputs where bf16 copies were kept. Fitted on two H100
    runs (benchmarks/results/single_gpu_speed/run24: 1.1B -4.5 GiB, 8B -4.0 GiB against bf16): one byte per
    hidden unit and two per intermediate one. LoRA (frozen float8 weights) keeps what bf16 keeps."""
    return hidden + 2.0 * intermediate


def check_device(device: torch.device, precision: str = "fp8") -> None:
    """Refuse a device without float8 matmuls, in one line that says what to use instead."""
    instead = stored_as(precision)
    if device.type != "cuda":
        raise UserInputError(
            f"PRECISION={precision} multiplies in float8 on NVIDIA GPUs of compute capability 8.9 or newer (Ada, "
            f"Hopper); this run is on the {device.type.upper()}: use PRECISION={instead}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise UserInputError(
            f"PRECISION={precision} needs float8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: use PRECISION={instead}"
        )


def check_recipe(recipe: str) -> None:
    """Refuse a ``--float8-recipe`` not in :data:`RECIPES`, naming those that are (needs no torchao)."""
    if recipe not in RECIPES:
        raise UserInputError(f"unknown --float8-recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def recipe_config(recipe: str):
    """torchao's ``Float8LinearConfig`` of one of :data:`RECIPES`."""
    check_recipe(recipe)
    from torchao.float8 import Float8LinearConfig

    if recipe == "tensorwise":
        return Float8LinearConfig()
    from torchao.float8.config import Float8GemmConfig

    fast = Float8GemmConfig(use_fast_accum=True)
    return Float8LinearConfig(gemm_config_grad_input=fast, gemm_config_grad_weight=fast)


def convert_blocks(
    model: torch.nn.Module, precision: str = "fp8", recipe: str = RECIPES[0], min_width: int = MIN_WIDTH
) -> int:
    """Swap the linear layers of ``model``'s decoder blocks that :func:`converts` for torchao's ``Float8Linear``
    (scaled as ``recipe`` says) in place; return how many. The weights stay the same parameters.

    Raises:
        UserInputError: torchao is not installed, an unknown recipe, or the model has no linear layer to convert.
    """
    check_recipe(recipe)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserInputError(f"PRECISION={precision} runs torchao's float8 training; install it: {INSTALL}") from None
    config = recipe_config(recipe)
    count = 0

    def chosen(module: torch.nn.Module, name: str) -> bool:
        nonlocal count
        take = type(module) is torch.nn.Linear and converts(name, module.in_features, module.out_features, min_width)
        count += take
        return take

    from .compile_layers import repeated_block_classes  # torch's Inductor: only where a run converts

    classes = repeated_block_classes(model)
    for block in [m for m in model.modules() if type(m).__name__ in classes]:
        convert_to_float8_training(block, module_filter_fn=chosen, config=config)
    if not count:
        raise UserInputError(
            f"PRECISION={precision} multiplies the decoder blocks' linear layers in float8, and "
            f"{type(model).__name__} has none that qualify (nn.Linear, both sizes divisible by 16, not narrow, "
            f"wider than --float8-min-width {min_width}); "
            f"use PRECISION={stored_as(precision)}"
        )
    return count
