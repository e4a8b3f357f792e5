"""Two CPU processes (gloo, through run.sh and torchrun) train data-parallel (FSDP2 at ZeRO 0: replicated)
with the single-process result."""

import torch

from fairseq_ext.cube.sharded_checkpoint import read_checkpoint
from tests.integration.test_run_sh import run_sh


def losses(stdout):
    from tests.helpers import train_losses

    return train_losses(stdout)


def test_two_processes_match_one_process_with_gradient_accumulation(tmp_path):
    common = dict(MAX_STEPS=6, BATCH_SIZE=4, EVALUATE=0, LOG_FORMAT="json", LOG_INTERVAL=1, SAVE_STEPS=6)
    two = run_sh(tmp_path / "two", NPROC_PER_NODE=2, GRADIENT_ACCU_NUM=1, **common)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = run_sh(tmp_path / "one", NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2, **common)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "distributed init (rank 1)" in two.stdout + (tmp_path / "two" / "out" / "log" / "train.log").read_text()

    got, expected = losses(two.stdout), losses(one.stdout)
    assert sorted(expected) == list(range(1, 7)) and sorted(got) == sorted(expected)
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-3, (step, got[step], expected[step])

    def weights(folder):
        return read_checkpoint(str(folder / "out" / "checkpoint" / "checkpoint_last.pt"))["model"]

    final_two, final_one = weights(tmp_path / "two"), weights(tmp_path / "one")
    for key, value in final_one.items():
        torch.testing.assert_close(final_two[key], value, rtol=1e-5, atol=1e-6, msg=key)
