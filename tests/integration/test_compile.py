"""run.sh compile: the plan it writes for the tiny Llama at PLAN_NGPUS=2 is one the runtime trains with
(PLAN_FILE, 2 gloo processes), and a budget nothing fits stops with one line naming the budget that would."""

import json
import re

import pytest

from fairseq_ext.cube.model_spec import RunSettings, spec_of
from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.profile import load_config
from tests.helpers import REPO
from tests.integration.test_run_sh import run_sh

SETTINGS = dict(PLAN_NGPUS=2, BATCH_SIZE=4, SEQUENCE_LENGTH=64, EVALUATE=0)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``run.sh compile`` of the tiny Llama at PLAN_NGPUS=2, MEM_PER_GPU=1 (full finetune), once per module:
    its result and the plan file it wrote."""
    folder = tmp_path_factory.mktemp("compiled")
    result = run_sh(folder, args=["compile"], MEM_PER_GPU=1, **SETTINGS)
    return result, folder / "out" / "plan.json"


def test_compiled_plan_trains_under_the_runtime(tmp_path, compiled):
    result, plan_file = compiled
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "chosen" in result.stdout
    plan = Plan.load(str(plan_file))
    assert plan.plan_ngpus == 2 and plan.tp * plan.pp == 2 and plan.model_fingerprint
    config = load_config(str(REPO / "cube_examples" / "finetune_hf_model" / "model" / "tiny-llama"))
    assert spec_of(config).unsupported(plan, RunSettings(batch_size=4)) == []

    trained = run_sh(
        tmp_path / "train",
        NPROC_PER_NODE=2,
        PLAN_FILE=plan_file,
        MAX_STEPS=3,
        SAVE_STEPS=3,
        WARMUP_STEPS=1,
        LOG_INTERVAL=1,
        LOG_FORMAT="json",
        **SETTINGS,
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    log = trained.stdout + (tmp_path / "train" / "out" / "log" / "train.log").read_text()
    assert json.dumps(plan.to_dict(), sort_keys=True) in log  # the runtime ran exactly the compiled plan
    assert '"num_updates": "3"' in log

    stale = run_sh(
        tmp_path / "stale", NPROC_PER_NODE=2, PLAN_FILE=plan_file, MAX_STEPS=3, **{**SETTINGS, "SEQUENCE_LENGTH": 128}
    )
    assert stale.returncode == 2 and "Traceback" not in stale.stderr, stale.stderr[-3000:]
    assert re.search(
        r"fairseq_ext: error: PLAN_FILE .*plan\.json was compiled for another model or other settings.*"
        r"run `bash run\.sh compile` again",
        stale.stderr,
    ), stale.stderr[-3000:]


def test_no_fit_is_one_clear_line(tmp_path):
    result = run_sh(tmp_path, args=["compile"], MEM_PER_GPU=0.001, **SETTINGS)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("fairseq_ext: error: no plan fits MEM_PER_GPU=0.001: the smallest needs 0.")
    assert not (tmp_path / "out" / "plan.json").exists()


LORA = dict(USE_LORA=1, LORA_CONFIG="r=4 lora_alpha=8 target_modules=q_proj,v_proj,o_proj,down_proj")


def test_lora_plan_counts_only_the_adapters_and_trains_lora_under_it(tmp_path, compiled):
    """With USE_LORA=1 the compile pass plans for the adapters alone (frozen base: no gradients or optimizer
    states for it; tests/unit/test_plan_calibration.py holds its memory against GPU runs) and without pipeline
    stages, the plan trains LoRA under the runtime, and it is refused for a full finetune."""
    full, full_plan_file = compiled
    lora = run_sh(tmp_path / "lora", args=["compile"], MEM_PER_GPU=1, **SETTINGS, **LORA)
    assert full.returncode == 0 and lora.returncode == 0, lora.stdout[-2000:] + lora.stderr[-3000:]
    plan_file = tmp_path / "lora" / "out" / "plan.json"
    assert Plan.load(str(plan_file)).model_fingerprint != Plan.load(str(full_plan_file)).model_fingerprint

    trained = run_sh(
        tmp_path / "train",
        NPROC_PER_NODE=2,
        PLAN_FILE=plan_file,
        MAX_STEPS=2,
        SAVE_STEPS=2,
        WARMUP_STEPS=1,
        LOG_INTERVAL=1,
        LOG_FORMAT="json",
        **SETTINGS,
        **LORA,
    )
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert '"num_updates": "2"' in trained.stdout + (tmp_path / "train" / "out" / "log" / "train.log").read_text()

    stale = run_sh(tmp_path / "stale", NPROC_PER_NODE=2, PLAN_FILE=plan_file, MAX_STEPS=2, **SETTINGS)
    assert stale.returncode == 2 and "compiled for another model or other settings" in stale.stderr, stale.stderr[
        -3000:
    ]
