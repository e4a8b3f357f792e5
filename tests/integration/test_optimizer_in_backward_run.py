"""OPTIMIZER_IN_BACKWARD=1 through run.sh on the tiny Llama (fp32, CPU): the same losses, gradient norms and
final weights per update as the step after the backward, with CLIP_NORM=0; with run.sh's default clipping the
run stops before training with one line saying what to change."""

import json

import pytest
import torch
from fairseq import checkpoint_utils

from tests.helpers import EXACT_LOSS_USER_DIR
from tests.integration.test_run_sh import run_sh

SETTINGS = dict(
    USER_DIR=EXACT_LOSS_USER_DIR, MAX_STEPS=4, BATCH_SIZE=4, WARMUP_STEPS=2, LOG_INTERVAL=1, LOG_FORMAT="json"
)


def _updates(stdout: str):
    """(exact loss, gnorm) per update from the JSON train_inner lines."""
    records = [
        json.loads(line.split("| train_inner |", 1)[1]) for line in stdout.splitlines() if "| train_inner |" in line
    ]
    return {int(r["num_updates"]): (r["exact_loss"], float(r["gnorm"])) for r in records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in (("after", {}), ("inside", {"OPTIMIZER_IN_BACKWARD": 1})):
        folder = tmp_path_factory.mktemp(name)
        result = run_sh(folder, EVALUATE=0, CLIP_NORM=0, **SETTINGS, **extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[name] = (result.stdout, folder / "out" / "checkpoint" / "checkpoint_last.pt")
    return out


def test_same_losses_norms_and_weights_as_the_step_after_the_backward(runs):
    (after, after_ckpt), (inside, inside_ckpt) = runs["after"], runs["inside"]
    assert "the optimizer steps each weight inside the backward" in inside
    assert "inside the backward" not in after
    expected, got = _updates(after), _updates(inside)
    assert sorted(got) == [1, 2, 3, 4]
    for update, (loss, gnorm) in expected.items():
        assert got[update][0] == pytest.approx(loss, rel=1e-6, abs=0), update
        assert got[update][1] == pytest.approx(gnorm, rel=1e-3), update  # logged with 3 decimals
    weights = [checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"] for path in (after_ckpt, inside_ckpt)]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_default_clipping_is_refused_with_what_to_change(tmp_path):
    result = run_sh(tmp_path, EVALUATE=0, MAX_STEPS=2, BATCH_SIZE=4, OPTIMIZER_IN_BACKWARD=1)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [
        "fairseq_ext: error: OPTIMIZER_IN_BACKWARD=1 steps each weight as soon as its gradient is final, but "
        "gradient clipping (--clip-norm 1) needs the norm of every gradient first; set CLIP_NORM=0 (--clip-norm 0; "
        "run.sh's default is 1.0) or OPTIMIZER_IN_BACKWARD=0 (and a PLAN_FILE without it)"
    ], result.stderr[-3000:]
