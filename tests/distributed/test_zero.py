"""ZeRO-1 on fairseq's DDP path (torch's ZeroRedundancyOptimizer): sharded optimizer states (less state per
rank), same steps as one process. Plans on a mesh shard with FSDP2 instead (test_fsdp_run_sh.py)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from fairseq_ext.cube.runtime.zero import local_state_numel, shard_optimizer_states, zero_group_ranks
from fairseq_ext.errors import UserInputError
from tests.helpers import spawn_ranks


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
        dist.barrier()  # rank 0 hosts the store: it stays until the other rank's groups (none shared) are made
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
