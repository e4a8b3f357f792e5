"""Sharded checkpoints (torch.distributed.checkpoint, gloo, 2-4 CPU ranks) reshard to other plans.

Four ranks on a (dp 2, tp 2) mesh shard a tiny Llama over tp and its Adam states with ZeRO-1 over dp
(each state is held by one dp rank), take one step with known gradients, and write one DCP folder: each
rank writes its own file, none holds the whole model. The folder is then read back three ways: in one
process (full tensors), by two ranks of tp 2 without ZeRO, and by four ranks of plain data parallel
with ZeRO-1 over all four. Every way gives the weights and Adam states of the same step taken in one
process on the full model. Ranks that do not share the save folder (nodes without a shared disk) are
refused with one clear message.
"""

import glob
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor

from fairseq_ext.cube.runtime.local_shards import full_tensor, local_tensor
from fairseq_ext.cube.runtime.tensor_parallel import apply_tensor_parallel
from fairseq_ext.cube.runtime.zero import shard_optimizer_states
from fairseq_ext.cube.sharded_checkpoint import (
    ModelShards,
    OptimizerShards,
    check_shared_save_dir,
    load_model_shards,
    model_entries,
    optimizer_entries,
    placed_like,
    read_full_state,
    read_optimizer_shards,
    write_shards,
)
from fairseq_ext.errors import UserInputError
from tests.distributed.test_tensor_parallel import init_group, tiny_llama
from tests.helpers import tensor_bytes_per_file

LR = 0.1


def full_gradient(param):
    """A gradient known in every process: a function of the full parameter's shape only."""
    return torch.sin(torch.arange(param.numel(), dtype=torch.float32) * 0.37).reshape(param.shape)


def local_gradient(param):
    grad = full_gradient(param)
    if hasattr(param, "device_mesh"):
        return distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None).to_local()
    return grad


def named_params(model):
    return [(name, p) for name, p in model.named_parameters()]


def join(rank, world_size, out, run):
    """gloo over a rendezvous file of this spawn's own (the folder ``out/run``)."""
    os.makedirs(f"{out}/{run}", exist_ok=True)
    init_group(rank, world_size, f"{out}/{run}")


def saving_worker(rank, world_size, out):
    """(dp 2, tp 2): tp shards, ZeRO-1 over the dp replicas of each shard; one step; write the folder.
    Then read it back as plain data parallel with ZeRO-1 over the 4 ranks."""
    join(rank, world_size, out, "save_run")
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = tiny_llama()
        apply_tensor_parallel(model, mesh["tp"])
        params = named_params(model)
        views = [local_tensor(p) for _, p in params]
        for (_, param), view in zip(params, views):
            view.grad = local_gradient(param)
        adam = torch.optim.Adam(views, lr=LR)
        zero = shard_optimizer_states(adam, {"lr": LR}, 1, replica_groups=[[0, 2], [1, 3]])
        zero.step()
        name = write_shards(f"{out}/save", {**model_entries(model), **optimizer_entries(zero, params)}, 1)
        held = sum(1 for state in zero.optim.state.values() if state)
        torch.save(
            {
                "name": name,
                "held": held,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in adam.param_groups],
            },
            f"{out}/saved{rank}.pt",
        )
        dist.barrier()
        load_as_dp4_with_zero(out, rank)  # the same processes, as another plan
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shards_of(out):
    saved = torch.load(f"{out}/saved0.pt", weights_only=False)
    folder = f"{out}/save/{saved['name']}"
    return folder, OptimizerShards(folder, saved["groups"], [n for n, _ in named_params(tiny_llama())])


def load_as_dp4_with_zero(out, rank):
    """Plain data parallel over the 4 ranks, ZeRO-1 over all: each rank reads only the states it holds."""
    folder, optimizer_shards = shards_of(out)
    model = tiny_llama(seed=5)  # other weights: all must come from the checkpoint
    load_model_shards(model, ModelShards(folder))
    params = named_params(model)
    zero = shard_optimizer_states(torch.optim.Adam([p for _, p in params], lr=LR), {"lr": LR}, 1)
    zero.load_state_dict(read_optimizer_shards(optimizer_shards, zero, params))
    states = {name: dict(zero.optim.state[p]) for name, p in params if zero.optim.state.get(p)}
    torch.save({"weights": {n: p.detach() for n, p in params}, "states": states}, f"{out}/dp4_{rank}.pt")


def tp2_loading_worker(rank, world_size, out):
    """tp 2 (another mesh, no ZeRO): model and optimizer read from the folder, gathered for the check."""
    join(rank, world_size, out, "tp2_run")
    try:
        folder, optimizer_shards = shards_of(out)
        model = tiny_llama(seed=5)  # other weights: all must come from the checkpoint
        apply_tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
        load_model_shards(model, ModelShards(folder))
        params = named_params(model)
        views = [local_tensor(p) for _, p in params]  # to_local() gives a new tensor object at every call
        adam = torch.optim.Adam(views, lr=LR)
        adam.load_state_dict(read_optimizer_shards(optimizer_shards, adam, params))
        states = {
            name: {key: full_tensor(placed_like(param, value)) for key, value in adam.state[view].items()}
            for (name, param), view in zip(params, views)
        }
        weights = {name: full_tensor(p).detach() for name, p in params}
        torch.save({"weights": weights, "states": states}, f"{out}/tp2_{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def one_process_step():
    model = tiny_llama()
    params = named_params(model)
    for _, param in params:
        param.grad = full_gradient(param)
    adam = torch.optim.Adam(model.parameters(), lr=LR)
    adam.step()
    return {n: p.detach() for n, p in params}, {n: adam.state[p] for n, p in params}


def assert_states_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for name, state in expected.items():
        assert sorted(got[name]) == sorted(state), name
        for key, value in state.items():
            torch.testing.assert_close(got[name][key], value, rtol=1e-6, atol=1e-7, msg=f"{name} {key}")


def assert_weights_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_dcp_checkpoint_of_tp_and_zero_reshards_to_other_plans(tmp_path):
    out = str(tmp_path)
    mp.spawn(saving_worker, args=(4, out), nprocs=4, join=True)
    weights, states = one_process_step()

    # Each rank wrote its own file, and none holds the whole model and optimizer.
    saved = [torch.load(f"{out}/saved{rank}.pt", weights_only=False) for rank in range(4)]
    folder = f"{out}/save/{saved[0]['name']}"
    assert os.listdir(f"{out}/save") == [saved[0]["name"]]  # the temporary folder was renamed
    assert sorted(os.path.basename(f) for f in glob.glob(f"{folder}/__*_*.distcp")) == [
        f"__{rank}_0.distcp" for rank in range(4)
    ]
    per_file = tensor_bytes_per_file(folder)
    full_bytes = 3 * 4 * sum(w.numel() for w in weights.values())  # weights, exp_avg, exp_avg_sq in fp32
    assert sum(per_file.values()) == full_bytes + 4 * len(weights), per_file  # + a float32 step each, all once
    assert max(per_file.values()) < 0.4 * full_bytes, per_file
    assert all(s["held"] < len(weights) for s in saved)  # ZeRO-1: each rank held part of the states

    model, got_states = read_full_state(folder)
    assert_weights_equal(model, weights)
    assert_states_equal(got_states, states)

    mp.spawn(tp2_loading_worker, args=(2, out), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(f"{out}/tp2_{rank}.pt", weights_only=False)
        assert_weights_equal(result["weights"], weights)
        assert_states_equal(result["states"], states)

    merged = {}
    for rank in range(4):
        result = torch.load(f"{out}/dp4_{rank}.pt", weights_only=False)
        assert_weights_equal(result["weights"], weights)
        assert not set(result["states"]) & set(merged)  # each state held by exactly one rank
        merged.update(result["states"])
    assert_states_equal(merged, states)


def shared_dir_worker(rank, world_size, out):
    """Each rank checks a save dir: the same one, then one of its own (two nodes without a shared disk)."""
    join(rank, world_size, out, "shared_run")
    try:
        check_shared_save_dir(f"{out}/shared")
        try:
            check_shared_save_dir(f"{out}/node{rank}")
            message = None
        except UserInputError as err:
            message = str(err)
        torch.save(message, f"{out}/shared{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_that_do_not_share_the_save_dir_get_one_clear_error(tmp_path):
    mp.spawn(shared_dir_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = torch.load(tmp_path / f"shared{rank}.pt", weights_only=False)
        assert (
            message
            and "ranks [1] do not see the first rank's files there; put CHECKPOINT_DIR on a "
            "filesystem all nodes share, or use CHECKPOINT_FORMAT=full"
            in message
        ), message
    assert not [n for n in os.listdir(tmp_path / "shared") if n.startswith(".shared-")]  # the probe is removed
