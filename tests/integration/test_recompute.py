"""RECOMPUTE_MODULE_NAMES: recomputed decoder layers give the same training; unknown names are a clear error."""

import json

import pytest
import torch
from fairseq import checkpoint_utils
from transformers import AutoModelForCausalLM

from fairseq_ext.cube.runtime.recompute import apply_recompute
from fairseq_ext.errors import UserInputError
from fairseq_ext.models.hf_loading import load_hf_model
from tests.helpers import MODEL_DIR, fairseq_train, tiny_train_args, train_losses


def test_recompute_reruns_forward_and_changes_no_result():
    model = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR))
    reference = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR))
    assert apply_recompute(model, ["LlamaDecoderLayer"]) == 2
    calls = []
    attention = next(m for m in model.modules() if type(m).__name__ == "LlamaAttention")
    attention.register_forward_hook(lambda *_: calls.append(1))
    input_ids = torch.tensor([[1, 40, 41, 42, 43]])
    for m in (model, reference):
        m(input_ids=input_ids, labels=input_ids).loss.backward()
    assert len(calls) == 2  # once in forward, once again in backward
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_unknown_module_name_lists_the_model_classes():
    model = load_hf_model(AutoModelForCausalLM, str(MODEL_DIR))
    with pytest.raises(
        UserInputError,
        match=r"RECOMPUTE_MODULE_NAMES LlamaLayer: no module of the model has that "
        r"class; its module classes are: .*LlamaDecoderLayer",
    ):
        apply_recompute(model, ["LlamaLayer"])


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """(result, save dir) of 4 updates without recompute: the reference of the full-finetune and plan runs."""
    save_dir = tmp_path_factory.mktemp("plain")
    return fairseq_train(tiny_train_args(save_dir, max_update=4)), save_dir


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fairseq_train_with_recompute_matches_without(tmp_path, lora, plain_run):
    extra = ["--use-lora"] if lora else []
    plain, plain_dir = plain_run
    if lora:
        plain_dir = tmp_path / "plain"
        plain = fairseq_train(tiny_train_args(plain_dir, max_update=4, extra=extra))
    recomputed = fairseq_train(
        tiny_train_args(
            tmp_path / "recompute", max_update=4, extra=extra + ["--recompute-module-names", "LlamaDecoderLayer"]
        )
    )
    assert plain.returncode == 0 and recomputed.returncode == 0, recomputed.stderr[-3000:]
    assert "recompute: 2 modules" in recomputed.stdout
    assert train_losses(recomputed.stdout) == train_losses(plain.stdout)
    final = [
        checkpoint_utils.load_checkpoint_to_cpu(str(folder / "checkpoint_last.pt"))["model"]
        for folder in (plain_dir, tmp_path / "recompute")
    ]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        torch.testing.assert_close(final[1][key], final[0][key], rtol=1e-6, atol=1e-7)


def test_a_plan_files_recompute_applies_on_one_process(tmp_path, plain_run):
    """recompute_modules of a PLAN_FILE (as the compile pass writes it) take effect with PLAN_NGPUS 1 too."""
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"plan_ngpus": 1, "scaling_factor": 1, "tp": 1, "pp": 1, "recompute_modules": ["LlamaDecoderLayer"]})
    )
    plain = plain_run[0]
    planned = fairseq_train(tiny_train_args(tmp_path / "planned", max_update=4, extra=["--plan-file", str(plan)]))
    assert plain.returncode == 0 and planned.returncode == 0, planned.stderr[-3000:]
    assert "recompute: 2 modules (LlamaDecoderLayer) from the plan" in planned.stdout + planned.stderr
    assert train_losses(planned.stdout) == train_losses(plain.stdout)
