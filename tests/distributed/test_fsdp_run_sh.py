"""Data parallel on FSDP2 through run.sh (torchrun, gloo, CPU, 4 processes): the sharding ZeRO levels (0, the
replicas, runs in ``test_data_parallel``), hybrid groups,
tensor parallel and pipeline stages inside the scale units, each resuming the one before it.

One checkpoint folder, four runs of 4 processes, each loading the sharded checkpoint the one before wrote
under another level and plan (``dcp.load`` reshards it), all with the global batch of 16 samples:

1. updates 1-3: ZeRO 3, 4 scale units of one process (weights, gradients and Adam states sharded 4 ways);
2. updates 4-5: ZeRO 2, hybrid groups 2 x 2 (ZERO_N_GROUPS=2: sharded inside pairs, replicated across);
3. updates 6-7: ZeRO 1, tp 2 x 2 units (2-D DTensors: tp inside, FSDP2 across), 2 batches accumulated
   per update in whole local gradients, reduce-scattered once;
4. updates 8-10: ZeRO 1, pp 2 x 2 units (each stage sharded over its 2 units), 2 batches accumulated.

Compared with one process accumulating 4 batches of 4, as ``test_plan_run_sh`` compares: the loss of every
update (relative 1e-5), the logged gradient norm, tokens and samples, and the final weights; the final
sharded checkpoint also exports to one Hugging Face folder with those weights.
"""

import json

import pytest
from safetensors.torch import load_file

from fairseq_ext.cube.checkpoint import export_hf
from tests.distributed.test_pipeline_run_sh import assert_sharded
from tests.distributed.test_plan_run_sh import (
    assert_same_training,
    assert_weights_match,
    chained,
    checkpoint_format,
    train,
)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return train(tmp_path_factory.mktemp("one"), NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=4)


def pipeline_plan(folder, **fields):
    plan = dict(plan_ngpus=2, scaling_factor=2, tp=1, pp=2, pp_schedule="1F1B", num_microbatches=2, **fields)
    path = folder / "pp2_x2.json"
    path.write_text(json.dumps(plan))
    return path


def test_zero_levels_hybrid_tp_and_pp_resume_each_other_and_match_one_process(tmp_path, one_process):
    runs = [
        dict(USE_ZERO=3, args=["--max-update", "3"]),
        dict(USE_ZERO=2, ZERO_N_GROUPS=2, args=["--max-update", "5"]),
        dict(USE_ZERO=1, PLAN_NGPUS=2, GRADIENT_ACCU_NUM=2, args=["--max-update", "7"]),
        dict(PLAN_FILE=pipeline_plan(tmp_path, zero=1), GRADIENT_ACCU_NUM=2),
    ]
    logged = [
        "data parallel (FSDP2, ZeRO 3): 2 blocks and 1 root(s) over 4 scale units, sharding 1 x 4",
        "data parallel (FSDP2, ZeRO 2): 2 blocks and 1 root(s) over 4 scale units, hybrid sharding 2 x 2",
        "data parallel (FSDP2, ZeRO 1): 2 blocks and 1 root(s) over 2 scale units, sharding 1 x 2",
        "data parallel (FSDP2, ZeRO 1): 1 blocks and 1 root(s) over 2 scale units, sharding 1 x 2",
    ]
    checkpoint_dir = tmp_path / "out" / "checkpoint"
    results = []
    for variables, line in zip(runs, logged):
        results.append(train(tmp_path, NPROC_PER_NODE=4, **variables))
        log = results[-1][3]
        assert line in log, log[-3000:]
        assert "DistributedDataParallel" not in log and "ZeRO-1: optimizer states sharded" not in log
        assert checkpoint_format(tmp_path) == "dcp"
        if len(results) == 1:  # ZeRO 3: each rank wrote its quarter of the weights and Adam states
            assert_sharded(checkpoint_dir, 4, one_process[2])
    assert "tensor parallel:" in results[2][3] and "pipeline rank 0: stages [0]" in results[3][3]
    assert [sorted(r[0]) for r in results] == [[1, 2, 3], [4, 5], [6, 7], [8, 9, 10]]
    resumed = chained(results)
    assert_same_training(resumed, one_process)

    export_hf(str(checkpoint_dir / "checkpoint_last.pt"), str(tmp_path / "hf"))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights = {name.removeprefix("hf_model."): value for name, value in one_process[2].items()}
    assert exported.keys() == weights.keys()
    for name, value in exported.items():
        assert_weights_match(value, weights[name], name)
