"""Find and load Hugging Face models and tokenizers offline: a local folder or a hub id already cached."""

import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from ..errors import UserInputError, one_line

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")


def resolve_model_folder(name_or_path: str) -> str:
    """Return a local folder for ``name_or_path``: the folder itself, or the cached snapshot of a hub id.

    Runs are offline: a hub id that is not in the local Hugging Face cache is a UserInputError.
    """
    if not name_or_path:
        raise UserInputError("no model given: set HUGGINGFACE_MODEL_NAME_OR_PATH (--hf-model-name-or-path)")
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise UserInputError(f"model path {name_or_path} is a file; it must be a model folder (config.json, tokenizer)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise UserInputError(
            f"model {name_or_path!r} is not a local folder and is not in the Hugging Face cache; runs are offline, "
            f"so download it first (huggingface-cli download {name_or_path}) or set HUGGINGFACE_MODEL_NAME_OR_PATH "
            "to a local folder"
        ) from None


def has_weights(folder: str) -> bool:
    """Whether a model folder holds weight files (safetensors or pytorch bins)."""
    return any(next(Path(folder).glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def load_config(folder: str, trust_remote_code: bool = False):
    """``AutoConfig`` of a model folder, with a clear error when the folder has none."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserInputError(f"model folder {folder} has no config.json")
    return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """``AutoTokenizer`` of a model folder or cached hub id."""
    folder = resolve_model_folder(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserInputError(f"could not load a tokenizer from {folder}: {err}") from None


def check_attn_implementation(name: str) -> None:
    """flash_attention_2 needs the flash-attn package; say so plainly instead of failing deep inside transformers."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserInputError(
            "--attn-implementation flash_attention_2 needs the flash-attn package, which is not "
            "installed; use sdpa (the default) or eager, or pip install flash-attn on a GPU machine"
        )


def init_device(task_cfg) -> torch.device:
    """Where a model initialised from its config is built: the run's GPU unless the run is on the CPU
    (``--cpu``); building there directly saves the host-side init and copy of billions of weights."""
    if torch.cuda.is_available() and not getattr(task_cfg, "cpu", False):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_hf_model(
    auto_class,
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    init_seed: int = 1,
    init_device: torch.device = None,
    **config_overrides,
):
    """Load ``auto_class`` (e.g. ``AutoModelForCausalLM``) from a folder or cached hub id.

    A folder with weights is loaded with ``from_pretrained``; weights it lacks (a new classification
    head) are initialised under ``init_seed``. A folder with only a config (like the shipped default
    model) is initialised from the config under ``init_seed``, on ``init_device`` (default: the CPU).
    Either way the random generators are used apart from the rest of the run, so the same seed always
    gives the same initial weights on the same kind of device.
    ``config_overrides`` (e.g. ``num_labels``, ``id2label``) replace values of the folder's config.
    """
    folder = resolve_model_folder(name_or_path)
    check_attn_implementation(attn_implementation)
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    init_device = torch.device(init_device or "cpu")
    with torch.random.fork_rng(devices=[init_device] if init_device.type == "cuda" else []):
        torch.manual_seed(init_seed)
        if has_weights(folder):
            try:
                return auto_class.from_pretrained(folder, **kwargs, **config_overrides)
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:
                raise UserInputError(
                    f"could not load the weights of {folder} ({one_line(err)}); its weight files "
                    f"are damaged or do not match its config.json: copy or download them again"
                ) from None
        logger.warning(
            f"{folder} has no weight files: initialising {auto_class.__name__} from its config "
            f"(seed {init_seed}, on {init_device})"
        )
        config = load_config(folder, trust_remote_code)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        with init_device:
            return auto_class.from_config(config, **kwargs)
