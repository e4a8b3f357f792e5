"""Model folders and cached hub ids, dtype and attention choices, and batching by --max-tokens."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from fairseq_ext.errors import UserInputError
from fairseq_ext.models.hf_loading import load_hf_model, resolve_model_folder
from tests.helpers import DATA_DIR, MODEL_DIR


def test_hub_id_in_the_local_cache_is_found_offline(tmp_path, monkeypatch):
    # the layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REVISION/...}
    repo = tmp_path / "models--my-org--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(MODEL_DIR, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    folder = resolve_model_folder("my-org/tiny-llama")
    assert folder.endswith(f"snapshots/{revision}")
    with pytest.raises(UserInputError, match="not in the Hugging Face cache; runs are offline"):
        resolve_model_folder("my-org/absent")


def test_dtype_and_attention_are_selectable():
    model = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), dtype="bfloat16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    same = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), init_seed=1)
    again = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), init_seed=1)
    other = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), init_seed=2)
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(same.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(same.state_dict()[weight], other.state_dict()[weight])


def test_flash_attention_without_the_package_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(UserInputError, match="flash_attention_2 needs the flash-attn package"):
        load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), attn_implementation="flash_attention_2")


def test_max_tokens_and_batch_multiple_shape_the_batches():
    from fairseq_ext.tasks.hf_finetune import HFFinetuneConfig, HFFinetuneTask

    task = HFFinetuneTask.setup_task(HFFinetuneConfig(data=str(DATA_DIR), hf_model_name_or_path=str(MODEL_DIR), seed=1))
    task.select_arch("hf_auto_causal_lm")
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    by_tokens = task.get_batch_iterator(dataset, max_tokens=400, seed=1).next_epoch_itr(shuffle=False)
    batches = list(by_tokens)
    assert sum(b["nsentences"] for b in batches) == len(dataset)
    assert all(b["net_input"]["input_ids"].numel() <= 400 for b in batches)
    task.load_dataset("valid")  # a new dataset object: fairseq caches one batch iterator per dataset
    by_multiple = task.get_batch_iterator(
        task.dataset("valid"), max_tokens=400, required_batch_size_multiple=4, seed=1
    ).next_epoch_itr(shuffle=False)
    assert all(b["nsentences"] % 4 == 0 for b in by_multiple)  # 200 samples: no remainder batch


def test_importing_the_user_dir_installs_the_cube_trainer():
    import fairseq_cli.train

    import fairseq_ext  # noqa: F401
    from fairseq_ext.cube.trainer import CubeTrainer

    assert fairseq_cli.train.Trainer is CubeTrainer
