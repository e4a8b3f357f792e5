"""On a GPU with float8 (compute capability 8.9+): PRECISION=fp8 trains compiled decoder layers whose wide linear
layers are torchao's Float8Linear, keeps bf16 parameters under bf16-master's names, and its losses follow
bf16-master's.

Runs on the GPU machine (``python -m pytest -q tests/gpu``).
"""

import json
import math
import shutil

import pytest
import torch

from tests.helpers import MODEL_DIR, build_trainer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA device with float8 (compute capability 8.9+)",
)


def wide_llama(folder):
    """The shipped tiny Llama's tokenizer and vocabulary with MLPs wide enough for float8 (256 -> 2048)."""
    shutil.copytree(MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=256, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4)
    config.update(num_key_value_heads=2, head_dim=64)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def train(tmp_path, precision, model):
    trainer, batches = build_trainer(
        tmp_path / precision,
        extra=["--hf-model-name-or-path", str(model), "--precision", precision, "--compile-layers"],
    )
    losses = [trainer.train_step([next(batches)])["loss"] for _ in range(6)]
    return trainer.model, losses


def test_fp8_trains_float8_linear_layers_with_losses_close_to_bf16_master(tmp_path):
    model_dir = wide_llama(tmp_path / "model")
    reference, reference_losses = train(tmp_path, "bf16-master", model_dir)
    model, losses = train(tmp_path, "fp8", model_dir)
    converted = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert len(converted) == 4 and all(n.endswith(("gate_proj", "up_proj")) for n in converted)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(math.isfinite(x) for x in losses)
    for ours, theirs in zip(losses, reference_losses):
        assert abs(ours - theirs) <= 0.03 * theirs, (losses, reference_losses)
    assert losses[-1] < losses[0]  # it learns
