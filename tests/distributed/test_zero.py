"""ZeRO-1: sharded optimizer states (less state per rank), same training as one process, resumable checkpoints."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from fairseq import checkpoint_utils

from fairseq_ext.cube.runtime.zero import local_state_numel, shard_optimizer_states, zero_group_ranks
from fairseq_ext.errors import UserInputError
from tests.helpers import spawn_ranks, train_losses
from tests.integration.test_run_sh import run_sh


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    return model, torch.randn(4, 16)


def worker(rank, port, out, num_groups):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, batch = model_and_batch()
        inner = torch.optim.AdamW(model.parameters(), lr=0.1)
        optimizer = shard_optimizer_states(inner, {"lr": 0.1}, num_groups)
        for _ in range(3):
            model(batch).square().mean().backward()  # same data on both ranks: grads need no all-reduce here
            optimizer.step()
            optimizer.zero_grad()
        torch.save(
            {"numel": local_state_numel(optimizer), "weights": [p.detach() for p in model.parameters()]},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_groups", [1, 2])
def test_states_are_sharded_and_steps_unchanged(tmp_path, num_groups):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_ranks(worker, (port, str(tmp_path), num_groups), nprocs=2)
    model, batch = model_and_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        model(batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    total = local_state_numel(optimizer)  # 2 moments x 824 parameters
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    if num_groups == 1:  # one group of 2: each rank holds its share only
        assert sum(r["numel"] for r in ranks) == total and all(r["numel"] < 0.75 * total for r in ranks)
    else:  # two groups of 1: nothing to share
        assert all(r["numel"] == total for r in ranks)
    for r in ranks:
        for got, expected in zip(r["weights"], model.parameters()):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-7)


def test_zero_groups_must_divide_replicas():
    assert zero_group_ranks(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UserInputError, match="ZERO_N_GROUPS 3 does not divide the 4 data-parallel replicas"):
        zero_group_ranks(4, 3)


def test_run_sh_zero_matches_one_process_and_resumes(tmp_path):
    common = dict(BATCH_SIZE=4, EVALUATE=0, LOG_FORMAT="json", LOG_INTERVAL=1, SAVE_STEPS=4)
    reference = run_sh(tmp_path / "one", NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2, MAX_STEPS=8, **common)
    assert reference.returncode == 0, reference.stderr[-3000:]
    # stopped after 4 of the 8 steps (fairseq's last --max-update wins; the LR schedule stays the 8-step one)
    first = run_sh(tmp_path / "zero", NPROC_PER_NODE=2, USE_ZERO=1, MAX_STEPS=8, args=["--max-update", "4"], **common)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (tmp_path / "zero" / "out" / "log" / "train.log").read_text()
    assert "ZeRO-1: optimizer states sharded among 2 replicas in 1 group(s)" in first.stdout + log
    checkpoint = tmp_path / "zero" / "out" / "checkpoint" / "checkpoint_last.pt"
    saved = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    assert len(saved["last_optimizer_state"]["state"]) == len(saved["model"])  # consolidated: every parameter
    resumed = run_sh(tmp_path / "zero", NPROC_PER_NODE=2, USE_ZERO=1, MAX_STEPS=8, **common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = train_losses(reference.stdout)
    got = {**train_losses(first.stdout), **train_losses(resumed.stdout)}
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-3, (step, got, expected)
