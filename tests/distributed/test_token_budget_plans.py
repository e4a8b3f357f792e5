"""MAX_TOKENS batches are global batches (``data/global_batches.py``): a run of two scale units (dp2, two
processes through run.sh, gloo) saves a checkpoint inside its first epoch, and one process accumulating two
micro-batches of the same MAX_TOKENS resumes from it at the same global batch: the updates after it train the
same samples as the uninterrupted dp2 run (tokens and samples equal, losses to 1e-5 relative from
``exact_loss``, fp32 CPU)."""

import json

from tests.distributed.test_pipeline_run_sh import plan_file
from tests.distributed.test_resume_epochs_parallel import copy_checkpoint
from tests.helpers import EXACT_LOSS_USER_DIR
from tests.integration.test_resume_epochs import small_data
from tests.integration.test_run_sh import run_sh

TOTAL, SAVED = 4, 2
SETTINGS = dict(
    MAX_TOKENS=32,
    SEQUENCE_LENGTH=64,
    MAX_STEPS=TOTAL,
    SAVE_STEPS=SAVED,
    WARMUP_STEPS=1,
    EVALUATE=0,
    LOG_FORMAT="json",
    LOG_INTERVAL=1,
    DATASET_NAME="toy_instructions",
    USER_DIR=EXACT_LOSS_USER_DIR,
)
ARGS = ["--disable-validation", "--keep-interval-updates", "-1"]


def updates(stdout):
    """{update: (exact loss, tokens, samples)} of the training log."""
    found = {}
    for line in stdout.splitlines():
        if "| train_inner |" in line:
            record = json.loads(line.split("| train_inner |", 1)[1])
            found[int(record["num_updates"])] = (float(record["exact_loss"]), record["wpb"], record["bsz"])
    return found


def test_a_dp2_token_budget_checkpoint_resumes_in_one_process_at_the_same_samples(tmp_path):
    data = small_data(tmp_path / "data")
    dp2 = run_sh(tmp_path / "dp2", args=ARGS, DATA_DIR=str(data), NPROC_PER_NODE=2, **SETTINGS)
    assert dp2.returncode == 0, dp2.stdout[-2000:] + dp2.stderr[-3000:]
    expected = updates(dp2.stdout)
    assert sorted(expected) == list(range(1, TOTAL + 1)), dp2.stdout[-3000:]
    assert "end of epoch 1" not in dp2.stdout.split(f'"num_updates": "{SAVED}"')[0]  # the checkpoint is mid-epoch

    copy_checkpoint(
        tmp_path / "dp2" / "out" / "checkpoint", f"checkpoint_1_{SAVED}.pt", tmp_path / "one" / "out" / "checkpoint"
    )
    one = run_sh(tmp_path / "one", args=ARGS, DATA_DIR=str(data), NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2, **SETTINGS)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    got = updates(one.stdout)
    assert sorted(got) == list(range(SAVED + 1, TOTAL + 1)), one.stdout[-3000:]
    for step, (loss, tokens, samples) in got.items():
        want_loss, want_tokens, want_samples = expected[step]
        assert (tokens, samples) == (want_tokens, want_samples), (step, got[step], expected[step])
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (step, loss, want_loss)
    # the updates hold several micro-batches of at most MAX_TOKENS padded tokens: more samples than one row
    assert all(float(samples) > 2 for _, _, samples in expected.values()), expected


def test_token_budget_batches_under_pp2_train_as_one_process(tmp_path):
    """MAX_TOKENS under pp 2 (1F1B, 4 micro-batches, two processes): each token-budget batch is split into the
    plan's micro-batches, padded with untrained rows to a multiple of them (here batches of 3 rows: 4 micro-batches
    of one row, the last all padding): the loss of each update (1e-5 relative), its tokens and samples, as one
    process training the same batches."""
    data = small_data(tmp_path / "data")
    settings = {**SETTINGS, "MAX_TOKENS": 48, "SAVE_STEPS": TOTAL, "DATA_DIR": str(data)}
    one = run_sh(tmp_path / "one", args=ARGS, NPROC_PER_NODE=1, **settings)
    pp2 = run_sh(
        tmp_path / "pp2", args=ARGS, NPROC_PER_NODE=2, PLAN_FILE=plan_file(tmp_path, num_microbatches=4), **settings
    )
    for result in (one, pp2):
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert '"pp": 2' in pp2.stdout
    expected, got = updates(one.stdout), updates(pp2.stdout)
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL + 1)), pp2.stdout[-3000:]
    for step, (loss, tokens, samples) in expected.items():
        assert got[step][1:] == (tokens, samples), (step, got[step], expected[step])
        assert abs(got[step][0] - loss) <= 1e-5 * abs(loss), (step, got[step][0], loss)
    # batches of fewer rows than micro-batches, and of a number they do not divide
    assert all(1 < float(samples) < 4 and float(samples) != 2 for _, _, samples in expected.values()), expected
