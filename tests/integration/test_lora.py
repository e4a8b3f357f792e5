"""USE_LORA through fairseq-train: few trainable weights, small checkpoints, adapters that reproduce the logits."""

import re

import pytest
import torch
from fairseq import checkpoint_utils
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fairseq_ext.cube.checkpoint import export_hf, load_trained
from fairseq_ext.models.hf_loading import load_hf_model
from tests.helpers import MODEL_DIR, fairseq_train, minilm_folder, tiny_train_args, train_losses

LORA = [
    "--use-lora",
    "--lora-config",
    "r=8 lora_alpha=16 target_modules=q_proj,k_proj,v_proj,o_proj",
    "--lr",
    "1e-2",
    "--batch-size",
    "8",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    result = fairseq_train(tiny_train_args(out, max_update=8, extra=LORA))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_lora_trains_few_weights_and_saves_only_them(lora_run):
    out, result = lora_run
    found = re.search(r"LoRA: training ([\d,]+) of ([\d,]+) parameters", result.stdout)
    trainable, total = (int(x.replace(",", "")) for x in found.groups())
    assert trainable < 0.05 * total
    losses = train_losses(result.stdout)
    assert losses[8] < losses[1], losses
    state = checkpoint_utils.load_checkpoint_to_cpu(str(out / "checkpoint_last.pt"))["model"]
    assert state and all("lora_A" in key or "lora_B" in key for key in state)
    assert sum(v.numel() for v in state.values()) == trainable


def test_lora_checkpoint_resumes(lora_run):
    out, _ = lora_run
    result = fairseq_train(tiny_train_args(out, max_update=10, extra=LORA))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loaded checkpoint" in result.stdout and sorted(train_losses(result.stdout)) == [9, 10]


def test_exported_adapter_and_merged_weights_reproduce_the_logits(lora_run, tmp_path):
    out, _ = lora_run
    checkpoint = str(out / "checkpoint_last.pt")
    cfg, _, model = load_trained(checkpoint)
    input_ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        expected = model(input_ids)
        export_hf(checkpoint, str(tmp_path / "adapter"))
        base = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR), init_seed=cfg.task.seed)
        adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(adapter(input_ids=input_ids).logits, expected)
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
        # the shipped model has no weight files: the export writes the base's initial weights beside the adapter
        written_base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter" / "base"))
        adapter = PeftModel.from_pretrained(written_base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(adapter(input_ids=input_ids).logits, expected)

        export_hf(checkpoint, str(tmp_path / "merged"), merge_lora=True)
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_on_a_classification_head_trains_the_head_and_exports_it(tmp_path):
    """SEQ_CLS: the new classifier is trained in full (modules_to_save), the encoder through adapters; the
    exported adapter on a freshly built base reproduces the logits."""
    args = tiny_train_args(
        tmp_path,
        max_update=6,
        extra=[
            "--arch",
            "hf_auto_seq_cls_lm",
            "--hf-model-name-or-path",
            minilm_folder(),
            "--dataset-type",
            "classification",
            "--dataset-name",
            "toy_sentiment",
            "--use-lora",
            "--lora-config",
            "r=8 lora_alpha=16",
            "--lr",
            "1e-3",
            "--batch-size",
            "16",
        ],
    )
    result = fairseq_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"LoRA: training ([\d,]+) of ([\d,]+) parameters", result.stdout)
    trainable, total = (int(x.replace(",", "")) for x in found.groups())
    assert trainable < 0.05 * total
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint_last.pt"))["model"]
    assert any("classifier" in key for key in state) and any("lora_A" in key for key in state)
    assert sum(v.numel() for v in state.values()) == trainable

    cfg, task, model = load_trained(str(tmp_path / "checkpoint_last.pt"))
    batch = task.tokenizer(["The teapot is lovely.", "We dislike the lamp."], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        export_hf(str(tmp_path / "checkpoint_last.pt"), str(tmp_path / "adapter"))
        base = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=3)
        adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(adapter(**batch).logits, expected)
