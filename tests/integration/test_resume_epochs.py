"""Resume is exact in every epoch: a run restarted from the checkpoint written inside the first epoch, at
its end, or inside a later epoch trains on the same batches in the same order as the run that never
stopped (per-update losses to 1e-6 relative, fp32 CPU, from ``exact_loss``: tests/assets/exact_loss).

The training split is cut to 20 samples, so an epoch is 5 updates of 4; the reference trains 12 updates
(into the third epoch) and saves after every update.
"""

import json
import shutil

from tests.helpers import DATA_DIR, EXACT_LOSS_USER_DIR, fairseq_train, tiny_train_args

TOTAL = 12


def small_data(folder):
    folder.mkdir()
    train = (DATA_DIR / "toy_instructions_train.json").read_text().splitlines(keepends=True)[:20]
    (folder / "toy_instructions_train.json").write_text("".join(train))
    for split in ("valid", "test"):
        shutil.copy(DATA_DIR / f"toy_instructions_{split}.json", folder)
    return folder


def precise_losses(stdout):
    """{update: loss} at full precision (fairseq rounds ``loss`` to 3 decimals): ``exact_loss``."""
    losses = {}
    for line in stdout.splitlines():
        if "| train_inner |" in line:
            record = json.loads(line.split("| train_inner |", 1)[1])
            losses[int(record["num_updates"])] = float(record["exact_loss"])
    return losses


def test_resume_from_any_epoch_matches_the_uninterrupted_run(tmp_path):
    data = small_data(tmp_path / "data")
    extra = ["--save-interval-updates", "1", "--keep-interval-updates", "-1"]
    reference = fairseq_train(
        tiny_train_args(tmp_path / "ref", data_dir=data, max_update=TOTAL, extra=extra, user_dir=EXACT_LOSS_USER_DIR)
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "end of epoch 2 (average epoch stats below)" in reference.stdout  # the run crossed two epoch ends
    expected = precise_losses(reference.stdout)
    assert sorted(expected) == list(range(1, TOTAL + 1))

    # inside epoch 1, at its end (fairseq's epoch checkpoint, pointing to epoch 2's start), inside epoch 2
    for start, name in ((3, "checkpoint_1_3.pt"), (5, "checkpoint1.pt"), (8, "checkpoint_2_8.pt")):
        save_dir = tmp_path / f"from{start}"
        save_dir.mkdir()
        shutil.copy(tmp_path / "ref" / name, save_dir / "checkpoint_last.pt")
        resumed = fairseq_train(
            tiny_train_args(save_dir, data_dir=data, max_update=TOTAL, extra=extra, user_dir=EXACT_LOSS_USER_DIR)
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = precise_losses(resumed.stdout)
        assert sorted(got) == list(range(start + 1, TOTAL + 1)), (start, sorted(got))
        for step, loss in got.items():
            assert abs(loss - expected[step]) <= 1e-6 * abs(expected[step]), (start, step, loss, expected[step])
