"""A run killed mid-way and started again gives the losses and weights of a run that never stopped; so does
a run resumed from sharded (DCP) checkpoints, whose fairseq files stay small."""

import os
import subprocess
import time

import torch
from fairseq import checkpoint_utils

from fairseq_ext.cube.sharded_checkpoint import read_checkpoint
from tests.helpers import (
    DATA_DIR,
    FAIRSEQ_TRAIN,
    FAIRSEQ_VALIDATE,
    REPO,
    env,
    fairseq_train,
    run,
    tiny_train_args,
    train_losses,
)

TOTAL = 24


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    extra = ["--save-interval-updates", "3", "--batch-size", "8"]
    reference = fairseq_train(tiny_train_args(tmp_path / "ref", max_update=TOTAL, extra=extra))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = train_losses(reference.stdout)
    assert sorted(expected) == list(range(1, TOTAL + 1))

    # The killed run would go on for 1000 updates; it is killed (SIGKILL) once its 6th-update checkpoint exists.
    save_dir = tmp_path / "killed"
    killed_args = tiny_train_args(save_dir, max_update=1000, extra=extra)
    proc = subprocess.Popen(
        [*FAIRSEQ_TRAIN, *killed_args], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (save_dir / "checkpoint_1_6.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    resumed_from = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    start = resumed_from["optimizer_history"][-1]["num_updates"]
    assert 0 < start < TOTAL, f"killed too late (checkpoint_last at update {start})"

    resumed = fairseq_train(tiny_train_args(save_dir, max_update=TOTAL, extra=extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Loaded checkpoint {save_dir / 'checkpoint_last.pt'}" in resumed.stdout
    got = train_losses(resumed.stdout)
    assert sorted(got) == list(range(start + 1, TOTAL + 1))
    assert got == {step: expected[step] for step in got}

    final_ref = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "ref" / "checkpoint_last.pt"))["model"]
    final_resumed = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))["model"]
    for key, value in final_ref.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_sharded_checkpoints_resume_in_one_process_and_stay_small(tmp_path):
    """``--checkpoint-format dcp`` in one process: fairseq's files stay small and name a shards folder,
    fairseq's ``--keep-interval-updates`` cleanup takes the folders of the files it deletes, fairseq-validate
    reads the checkpoint, and a run resumed from it gives the losses and weights of a run that never stopped."""
    extra = ["--save-interval-updates", "2", "--keep-interval-updates", "1"]
    reference = fairseq_train(tiny_train_args(tmp_path / "ref", max_update=8, extra=extra))
    assert reference.returncode == 0, reference.stderr[-3000:]
    sharded = [*extra, "--checkpoint-format", "dcp"]
    first = fairseq_train(tiny_train_args(tmp_path / "dcp", max_update=4, extra=sharded))
    assert first.returncode == 0, first.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "dcp"))
    folders = [n for n in names if n.endswith(".dcp")]
    assert len(folders) == 1 and folders[0].startswith("shards-u4-"), names  # u2's folder left with its file
    assert [n for n in names if n.endswith(".pt")] == ["checkpoint_1_4.pt", "checkpoint_last.pt"], names
    for name in ("checkpoint_1_4.pt", "checkpoint_last.pt"):
        raw = torch.load(tmp_path / "dcp" / name, weights_only=False)
        assert "model" not in raw and "last_optimizer_state" not in raw and raw["dcp"]["folder"] == folders[0]
        assert raw["extra_state"]["train_iterator"]["iterations_in_epoch"] == 4
        assert os.path.getsize(tmp_path / "dcp" / name) < 64 * 1024  # the model alone is 2 MB
    validated = run(
        [
            *FAIRSEQ_VALIDATE,
            DATA_DIR,
            "--user-dir",
            REPO / "fairseq_ext",
            "--task",
            "hf_finetune",
            "--path",
            tmp_path / "dcp" / "checkpoint_last.pt",
            "--cpu",
            "--batch-size",
            "16",
        ]
    )
    assert validated.returncode == 0 and "valid on 'valid' subset" in validated.stdout, validated.stderr[-3000:]
    resumed = fairseq_train(tiny_train_args(tmp_path / "dcp", max_update=8, extra=sharded))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = train_losses(reference.stdout), train_losses(resumed.stdout)
    assert sorted(got) == [5, 6, 7, 8] and got == {step: expected[step] for step in got}
    final_ref = read_checkpoint(str(tmp_path / "ref" / "checkpoint_last.pt"))["model"]
    final_resumed = read_checkpoint(str(tmp_path / "dcp" / "checkpoint_last.pt"))["model"]
    assert final_resumed.keys() == final_ref.keys()
    for key, value in final_ref.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-6, atol=1e-7, msg=key)
