"""Resume is exact in every epoch under a tp2 x dp2 plan (4 processes through run.sh, gloo, sharded checkpoints):
restarted from the checkpoint written inside the first epoch, at its end, or inside the second, the run trains on
the same batches in the same order as the run that never stopped (per-update losses to 1e-6 relative, fp32 CPU).

As in tests/integration/test_resume_epochs.py, the training split is cut to 20 samples; a global batch is 4 (2 per
scale unit, 2 units), so an epoch is 5 updates. The reference trains 8 updates, saving after each; every resume
starts from a copy of one of its checkpoints (the small file and the shards folder it names).
"""

import shutil

import torch

from tests.helpers import EXACT_LOSS_USER_DIR
from tests.integration.test_resume_epochs import precise_losses, small_data
from tests.integration.test_run_sh import run_sh

TOTAL = 8
SETTINGS = dict(
    NPROC_PER_NODE=4,
    PLAN_NGPUS=2,
    BATCH_SIZE=2,
    MAX_STEPS=TOTAL,
    SAVE_STEPS=1,
    WARMUP_STEPS=2,
    SEQUENCE_LENGTH=64,
    EVALUATE=0,
    LOG_FORMAT="json",
    LOG_INTERVAL=1,
    DATASET_NAME="toy_instructions",
    USER_DIR=EXACT_LOSS_USER_DIR,
)
ARGS = ["--keep-interval-updates", "-1", "--disable-validation"]


def train(folder, data):
    result = run_sh(folder, args=ARGS, DATA_DIR=str(data), **SETTINGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def copy_checkpoint(source, name, checkpoint_dir):
    """``source``/``name`` as ``checkpoint_dir``/checkpoint_last.pt, with the shards folder it names."""
    checkpoint_dir.mkdir(parents=True)
    folder = torch.load(source / name, weights_only=False)["dcp"]["folder"]
    shutil.copytree(source / folder, checkpoint_dir / folder)
    shutil.copy(source / name, checkpoint_dir / "checkpoint_last.pt")


def test_tp2_dp2_resume_from_any_epoch_matches_the_uninterrupted_run(tmp_path):
    data = small_data(tmp_path / "data")
    reference = train(tmp_path / "ref", data)
    assert '"tp": 2' in reference and '"scaling_factor": 2' in reference, "the plan is printed"
    assert "end of epoch 1 (average epoch stats below)" in reference
    expected = precise_losses(reference)
    assert sorted(expected) == list(range(1, TOTAL + 1))
    saved = tmp_path / "ref" / "out" / "checkpoint"

    # inside epoch 1, at its end (fairseq's epoch checkpoint, pointing to epoch 2's start), inside epoch 2
    for start, name in ((3, "checkpoint_1_3.pt"), (5, "checkpoint1.pt"), (7, "checkpoint_2_7.pt")):
        folder = tmp_path / f"from{start}"
        copy_checkpoint(saved, name, folder / "out" / "checkpoint")
        got = precise_losses(train(folder, data))
        assert sorted(got) == list(range(start + 1, TOTAL + 1)), (start, sorted(got))
        for step, loss in got.items():
            assert abs(loss - expected[step]) <= 1e-6 * abs(expected[step]), (start, step, loss, expected[step])
