"""Checkpoints: load a trained fairseq checkpoint back into its task and model; export to Hugging Face.

Full and sharded checkpoints alike (``sharded_checkpoint.py``): a sharded one is read into full
tensors in this process, whatever plan and world size wrote it.

Every folder or file written here appears whole or not at all: it is written under a temporary name
beside its destination and renamed into place.
"""

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from typing import Dict, Optional, Sequence, Tuple

from fairseq import tasks, utils

from ..errors import UserInputError
from ..models.hf_loading import has_weights, resolve_model_folder
from ..models.lora import is_lora
from .sharded_checkpoint import read_checkpoint

BASE_FOLDER = "base"  # in a LoRA export: the base's weights, when its own folder has none
logger = logging.getLogger(__name__)


def load_trained(checkpoint_path: str, arg_overrides: Optional[Dict] = None) -> Tuple[object, object, object]:
    """Rebuild the task and model a checkpoint was trained with and load its weights.

    Returns:
        (cfg, task, model): the checkpoint's fairseq config, its task (with the tokenizer) and the
        fairseq model with the checkpoint's weights, on the CPU, in eval mode.
    """
    if not os.path.isfile(checkpoint_path):
        raise UserInputError(f"checkpoint {checkpoint_path}: no such file")
    state = read_checkpoint(checkpoint_path, arg_overrides=arg_overrides, optimizer=False)  # full or sharded
    cfg = state["cfg"]
    cfg.common.user_dir = user_dir_here(cfg.common.user_dir)
    utils.import_user_module(cfg.common)  # a user's --user-dir registers its dataset types, templates, models
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True)
    return cfg, task, model.eval()


def user_dir_here(user_dir: Optional[str]) -> Optional[str]:
    """The --user-dir a checkpoint recorded, as this process can import it.

    A package of that name already imported from another folder (``fairseq_ext`` of a checkout that was
    copied or moved since training, which the scripts import from beside themselves) is the one used:
    fairseq refuses to import a second package of the same name. A recorded folder that no longer exists
    is one clear error.
    """
    if not user_dir:
        return user_dir
    path = os.path.abspath(user_dir)
    loaded = sys.modules.get(os.path.basename(path.rstrip(os.sep)))
    if loaded is not None and getattr(loaded, "__file__", None):
        here = os.path.dirname(os.path.abspath(loaded.__file__))
        if path not in list(getattr(loaded, "__path__", [])):
            return here
    if os.path.exists(path):
        return user_dir
    spec = importlib.util.find_spec(os.path.basename(path.rstrip(os.sep)))
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    raise UserInputError(
        f"the checkpoint was trained with --user-dir {user_dir}, which does not exist any more; "
        "put that package back at this path, or on PYTHONPATH, and run again"
    )


def load_initial(train_args: Sequence[str]) -> Tuple[object, object, object]:
    """Build the task and model exactly as ``fairseq-train train_args`` starts training (same seeded init).

    Returns:
        (cfg, task, model) like ``load_trained``, with the model's initial weights.
    """
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), list(train_args))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return cfg, task, model.eval()


@contextlib.contextmanager
def atomic_directory(destination: str, overwrite: bool = False):
    """Yield a temporary folder beside ``destination``; on success it replaces ``destination`` in one rename.

    An existing ``destination`` is kept if anything fails, and is refused unless ``overwrite``.
    """
    destination = os.path.abspath(destination)
    if os.path.exists(destination) and not overwrite:
        raise UserInputError(f"{destination} already exists; choose another folder or pass --overwrite")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(destination):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.old-", dir=parent)
        os.rename(destination, os.path.join(old, "previous"))
    os.rename(tmp, destination)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def export_hf(checkpoint_path: str, out_dir: str, overwrite: bool = False, merge_lora: bool = False) -> str:
    """Write a checkpoint's model as a Hugging Face folder (``save_pretrained`` + tokenizer) at ``out_dir``.

    The weights are the checkpoint's, bit for bit; ``AutoModelFor*.from_pretrained(out_dir)`` loads them.
    A LoRA checkpoint becomes a PEFT adapter folder (``PeftModel.from_pretrained(base, out_dir)``), or,
    with ``merge_lora``, full weights with the adapters merged in. When the base model's folder has no
    weight files (initialised from its config), its initial weights are written to ``out_dir/base``.
    """
    cfg, task, model = load_trained(checkpoint_path)
    hf_model = getattr(model, "hf_model", None)
    if hf_model is None:
        raise UserInputError(
            f"{checkpoint_path} holds a {type(model).__name__} (--arch {cfg.model._name}), not a "
            "Hugging Face model: there is nothing to export with save_pretrained"
        )
    # a LoRA base without weight files (initialised from its config under --seed) exists nowhere else
    base_without_weights = (
        is_lora(hf_model) and not merge_lora and not has_weights(resolve_model_folder(cfg.task.hf_model_name_or_path))
    )
    if merge_lora:
        if not is_lora(hf_model):
            raise UserInputError(f"{checkpoint_path} was not trained with LoRA; export it without --merge-lora")
        hf_model = hf_model.merge_and_unload()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        hf_model.save_pretrained(tmp)
        task.tokenizer.save_pretrained(tmp)
        if base_without_weights:
            hf_model.unload().save_pretrained(os.path.join(tmp, BASE_FOLDER))
            task.tokenizer.save_pretrained(os.path.join(tmp, BASE_FOLDER))
            logger.warning(
                f"the LoRA base {cfg.task.hf_model_name_or_path} has no weight files: its initial weights "
                f"are written to {os.path.join(out_dir, BASE_FOLDER)}; load the adapter onto them, or "
                f"export with --merge-lora for one folder of full weights"
            )
    return out_dir
