"""build_mesh on 4 CPU processes (gloo): rank layout (tp fastest, then pp, then dp: dp_shard, then
dp_replicate), subgroup collectives, and the world-size check raised in every rank."""

import json
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fairseq_ext.cube.plan import Plan
from fairseq_ext.cube.runtime.mesh import DP, MESH_AXES, PP, TP, backend_for, build_mesh
from fairseq_ext.errors import UserInputError

WORLD_SIZE = 4
TIMEOUT_S = 180

DP2_TP2 = Plan(plan_ngpus=2, scaling_factor=2, tp=2, pp=1, zero=1)  # the 2 units shard: dp_shard 2
PP2_TP2 = Plan(plan_ngpus=4, scaling_factor=1, tp=2, pp=2, num_microbatches=2)
WORLD_8 = Plan(plan_ngpus=4, scaling_factor=2, tp=4, pp=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(mesh):
    """What one rank sees of the mesh: its coordinate, its group per axis, and subgroup all-reduce sums."""
    rank = dist.get_rank()
    out = {"shape": list(mesh.shape), "axes": list(mesh.mesh_dim_names), "coordinate": mesh.get_coordinate()}
    for axis in (DP, PP, TP):
        group = mesh.get_group(axis)
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value, group=group)
        out[axis] = {"ranks": dist.get_process_group_ranks(group), "sum": value.item()}
    return out


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(backend_for("cpu"), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        result = {"dp2_tp2": _describe(build_mesh(DP2_TP2, "cpu")), "pp2_tp2": _describe(build_mesh(PP2_TP2, "cpu"))}
        try:
            build_mesh(WORLD_8, "cpu")
            result["world_8"] = None
        except UserInputError as exc:
            result["world_8"] = str(exc)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def _run_ranks(tmp_path):
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):  # raises with the child's traceback if a rank fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"ranks did not finish within {TIMEOUT_S} s")
    return {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)}


def test_mesh_layout_groups_and_world_size_check(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = _run_ranks(tmp_path)

    # dp2 x tp2 at ZeRO 1, shape (1, 2, 1, 2): rank = dp_shard * 2 + tp.
    #   tp groups [0, 1], [2, 3]; dp groups [0, 2], [1, 3]; pp groups are single ranks.
    expected_dp2_tp2 = {
        0: ([0, 0, 0, 0], [0, 2], [0], [0, 1]),
        1: ([0, 0, 0, 1], [1, 3], [1], [0, 1]),
        2: ([0, 1, 0, 0], [0, 2], [2], [2, 3]),
        3: ([0, 1, 0, 1], [1, 3], [3], [2, 3]),
    }
    # pp2 x tp2, shape (1, 1, 2, 2): rank = pp * 2 + tp.
    #   tp groups [0, 1], [2, 3]; pp groups [0, 2], [1, 3]; dp groups are single ranks.
    expected_pp2_tp2 = {
        0: ([0, 0, 0, 0], [0], [0, 2], [0, 1]),
        1: ([0, 0, 0, 1], [1], [1, 3], [0, 1]),
        2: ([0, 0, 1, 0], [2], [0, 2], [2, 3]),
        3: ([0, 0, 1, 1], [3], [1, 3], [2, 3]),
    }
    for name, shape, expected in (
        ("dp2_tp2", [1, 2, 1, 2], expected_dp2_tp2),
        ("pp2_tp2", [1, 1, 2, 2], expected_pp2_tp2),
    ):
        for rank, (coordinate, dp_ranks, pp_ranks, tp_ranks) in expected.items():
            seen = results[rank][name]
            assert seen["shape"] == shape and seen["axes"] == list(MESH_AXES), (name, rank, seen)
            assert seen["coordinate"] == coordinate, (name, rank, seen)
            for axis, ranks in ((DP, dp_ranks), (PP, pp_ranks), (TP, tp_ranks)):
                assert seen[axis]["ranks"] == ranks, (name, rank, axis, seen)
                # each rank contributed rank + 1: the sum covers its own group only
                assert seen[axis]["sum"] == sum(r + 1 for r in ranks), (name, rank, axis, seen)

    for rank in range(WORLD_SIZE):
        assert results[rank]["world_8"] == (
            "PLAN_NGPUS 4 x CUBE_SCALING_FACTOR 2 = 8 does not equal the world size 4 (NPROC_PER_NODE x NNODES)"
        ), rank


def test_backend_for():
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
