"""Pipeline-parallel plans through run.sh (torchrun, gloo, CPU) give the single-process training.

Each plan is a hand-written Plan JSON (PLAN_FILE) run on the tiny Llama for 10 updates and compared with
one process on the same data order and global batch, as in ``test_plan_run_sh.py``: the loss of every
update (relative 1e-5), the logged gradient norm, tokens and samples (the norm sums over the stages; the
counts are the unit's, not summed over its stages), and every parameter of the saved checkpoint (sharded:
each rank writes its own stages' shards), read into one full model in one process.

The 4-layer model (a copy of the shipped tiny Llama with ``num_hidden_layers`` 4) lets interleaved 1F1B
run 2 virtual stages per rank; its weights are initialised from the config under the seed, the same in
one process and on every pipeline rank (each builds the full model, then keeps its stages).
"""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fairseq_ext.cube.checkpoint import export_hf
from tests.distributed.test_plan_run_sh import (
    COMMON,
    assert_same_training,
    assert_weights_match,
    chained,
    counted,
    full_precision_losses,
    train,
)
from tests.helpers import MODEL_DIR, tensor_bytes_per_file
from tests.integration.test_run_sh import run_sh


def plan_file(folder, **fields):
    """Write a Plan JSON for one scale unit of tp x pp (more units with ``scaling_factor``)."""
    plan = {"scaling_factor": 1, "tp": 1, "pp": 2, "pp_schedule": "1F1B", "num_microbatches": 2, **fields}
    plan["plan_ngpus"] = plan["tp"] * plan["pp"]
    path = folder / "plan.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))
    return path


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny-llama-4"
    shutil.copytree(MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Single-process references, trained once per module: (model folder or None, accumulation)."""
    cache, folders = {}, {}

    def reference(model=None, accumulation=1):
        key = (str(model), accumulation)
        if key not in cache:
            folders[key] = tmp_path_factory.mktemp("one")
            extra = {"HUGGINGFACE_MODEL_NAME_OR_PATH": model} if model else {}
            cache[key] = train(folders[key], NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=accumulation, **extra)
        return cache[key]

    def checkpoint():
        """checkpoint_last.pt of the shipped model's reference run (a full checkpoint)."""
        reference()
        return folders[("None", 1)] / "out" / "checkpoint" / "checkpoint_last.pt"

    reference.checkpoint = checkpoint
    return reference


def assert_sharded(checkpoint_dir, num_ranks, weights):
    """fairseq's checkpoint files are small and hold no tensors of the model or optimizer; the shards folder
    they name has one file per rank, each with a part of the model and optimizer: every tensor is stored
    once and no rank stored the whole model.

    Args:
        weights: the full model's state_dict (the model is float32; Adam keeps two moments and a step each).
    """
    files = sorted(checkpoint_dir.glob("*.pt"))
    assert files
    folders = set()
    for path in files:
        raw = torch.load(path, weights_only=False)
        assert "model" not in raw and "last_optimizer_state" not in raw, path
        assert os.path.getsize(path) < 64 * 1024, (path, os.path.getsize(path))  # the model alone is 2 MB
        folders.add(raw["dcp"]["folder"])
    assert sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir()) == sorted(folders)  # none left over
    for folder in folders:
        per_file = tensor_bytes_per_file(checkpoint_dir / folder)
        assert sorted(per_file) == [f"__{rank}_0.distcp" for rank in range(num_ranks)], per_file
        total = sum(per_file.values())
        assert total == 3 * 4 * sum(w.numel() for w in weights.values()) + 4 * len(weights), per_file
        assert max(per_file.values()) < 0.4 * total, per_file


def test_pp2_1f1b_matches_one_process(tmp_path, one_process):
    run = train(tmp_path, NPROC_PER_NODE=2, PLAN_FILE=plan_file(tmp_path))
    assert '"pp": 2' in run[3] and "pipeline rank 0: stages [0], decoder layers ['0-0']" in run[3]
    assert_same_training(run, one_process())


def test_pp2_interleaved_with_gradient_accumulation_matches_one_process(tmp_path, one_process, four_layer_model):
    """Interleaved 1F1B, 2 stages of one layer per rank, and fairseq's accumulation over 2 batches
    (two pipeline steps per update, gradients adding up in the stages)."""
    plan = plan_file(tmp_path, pp_schedule="Interleaved1F1B", virtual_stages_per_rank=2)
    run = train(
        tmp_path, NPROC_PER_NODE=2, PLAN_FILE=plan, HUGGINGFACE_MODEL_NAME_OR_PATH=four_layer_model, GRADIENT_ACCU_NUM=2
    )
    assert "pipeline rank 0: stages [0, 2], decoder layers ['0-0', '2-2']" in run[3]
    assert_same_training(run, one_process(four_layer_model, accumulation=2))


def test_tp2_x_pp2_matches_one_process(tmp_path, one_process):
    """4 processes, one scale unit: 2 stages of one layer each, each sharded over tp 2 (the embeddings and
    the LM head stay replicated over tp under pipeline parallel)."""
    run = train(tmp_path, NPROC_PER_NODE=4, PLAN_FILE=plan_file(tmp_path, tp=2))
    assert '"tp": 2' in run[3] and "tensor parallel:" in run[3]
    assert_same_training(run, one_process())
    # Export of the sharded checkpoint, read in this one process: the single-process run's export.
    assert "model" not in torch.load(tmp_path / "out" / "checkpoint" / "checkpoint_last.pt", weights_only=False)
    export_hf(str(tmp_path / "out" / "checkpoint" / "checkpoint_last.pt"), str(tmp_path / "hf"))
    export_hf(str(one_process.checkpoint()), str(tmp_path / "hf_one"))
    exported, single = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("hf", "hf_one"))
    assert exported.keys() == single.keys() and len(single) == len(one_process()[2])
    for name, value in exported.items():
        assert_weights_match(value, single[name], name)


def test_two_pp2_units_with_recompute_match_one_process(tmp_path, one_process):
    """4 processes: 2 scale units of pp 2, decoder layers recomputed in backward. Unit u reads batches u,
    u+2, ..., so one update sees two consecutive batches: one process with GRADIENT_ACCU_NUM=2."""
    plan = plan_file(tmp_path, scaling_factor=2, pp_schedule="GPipe", recompute_modules=["LlamaDecoderLayer"])
    run = train(tmp_path, NPROC_PER_NODE=4, PLAN_FILE=plan)
    assert '"scaling_factor": 2' in run[3] and '"recompute_modules": ["LlamaDecoderLayer"]' in run[3]
    assert_same_training(run, one_process(accumulation=2))


def test_pipeline_checkpoint_resumes_under_dp4_and_in_one_process(tmp_path, one_process):
    """tp 2 x pp 2 for updates 1-3 writes a sharded checkpoint (each of the 4 ranks its own shards). From it,
    the same plan trains 4-5 (each rank reads back its shards), four data-parallel processes of
    BATCH_SIZE 1 (the same global batch of 4) train 6-7 and write a sharded checkpoint of their own, then
    one process trains 8-10; and, from a copy of the first checkpoint, one process trains 4-10. Both give
    the losses, gradient norms and final weights of one process that never stopped: the shards are read
    back under each plan, and the data position counts global batches, so each plan resumes at the same
    samples."""
    plan = plan_file(tmp_path / "plan", tp=2)
    runs = [
        dict(NPROC_PER_NODE=4, PLAN_FILE=plan, args=["--max-update", "3"]),
        dict(NPROC_PER_NODE=4, PLAN_FILE=plan, args=["--max-update", "5"]),
        dict(NPROC_PER_NODE=4, BATCH_SIZE=1, CHECKPOINT_FORMAT="dcp", args=["--max-update", "7"]),
        dict(NPROC_PER_NODE=1),
    ]
    checkpoint_dir = tmp_path / "out" / "checkpoint"
    results = []
    for variables in runs:
        results.append(train(tmp_path, **variables))
        if len(results) == 1:
            assert_sharded(checkpoint_dir, 4, one_process()[2])
            shutil.copytree(checkpoint_dir, tmp_path / "copy" / "out" / "checkpoint")
    assert [sorted(r[0]) for r in results] == [[1, 2, 3], [4, 5], [6, 7], [8, 9, 10]]
    resumed = chained(results)
    assert_same_training(resumed, one_process())
    direct = train(tmp_path / "copy", NPROC_PER_NODE=1)
    assert sorted(direct[0]) == list(range(4, 11))
    first = results[0]
    assert_same_training(({**first[0], **direct[0]}, {**first[1], **direct[1]}, direct[2], direct[3]), one_process())


BAD_PIPELINE_PLANS = {
    "micro-batches do not divide the batch size": (
        dict(num_microbatches=3),
        r"BATCH_SIZE 4 is not divisible by the plan's num_microbatches 3",
    ),
    "more stages than layers": (
        dict(pp_schedule="Interleaved1F1B", virtual_stages_per_rank=2),
        r"4 pipeline stages exceed num_hidden_layers 2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PIPELINE_PLANS))
def test_bad_pipeline_plan_gets_one_clear_error(tmp_path, case):
    fields, message = BAD_PIPELINE_PLANS[case]
    result = run_sh(tmp_path, **{**COMMON, "NPROC_PER_NODE": 2, "PLAN_FILE": plan_file(tmp_path, **fields)})
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("layout", ["PACK_SEQUENCES", "PADDING_FREE"])
def test_packed_rows_under_pp2_train_as_one_process(tmp_path, layout):
    """PACK_SEQUENCES=1 (samples packed into rows) or PADDING_FREE=1 (a batch's samples as one row) under pp 2
    (1F1B, 2 micro-batches): each batch's documents are laid out as one row per micro-batch and every stage
    attends inside them (document_varlen, no mask): the loss of each of 4 updates (1e-5 relative), its tokens
    and samples, as one process training the same batches."""
    settings = {layout: 1, "MAX_STEPS": 4, "SAVE_STEPS": 4, "BATCH_SIZE": 2}
    one = run_sh(tmp_path / "one", **{**COMMON, **settings, "NPROC_PER_NODE": 1})
    pp2 = run_sh(tmp_path / "pp2", **{**COMMON, **settings, "NPROC_PER_NODE": 2, "PLAN_FILE": plan_file(tmp_path)})
    for result in (one, pp2):
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    on = "packed" in pp2.stdout + pp2.stderr if layout == "PACK_SEQUENCES" else "'padding_free': True" in pp2.stdout
    assert '"pp": 2' in pp2.stdout and on
    expected, got = full_precision_losses(one.stdout), full_precision_losses(pp2.stdout)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
    expected_counts, got_counts = counted(one.stdout), counted(pp2.stdout)
    for step, (_, tokens, samples) in expected_counts.items():
        assert got_counts[step][1:] == (tokens, samples), (step, got_counts[step], expected_counts[step])
