"""fairseq's DDP path through run.sh (gloo, CPU, 2 processes): a user's own nn.Module (not a Hugging Face model,
nothing for FSDP2 to shard) trains data parallel on fairseq's DistributedDataParallel, with its Adam states
sharded by torch's ZeroRedundancyOptimizer (USE_ZERO=1), as one process accumulating the same global batch:
the same losses (fairseq's 3 logged decimals), tokens and samples per update and final weights (float32
rounding of the averaged gradients apart: 1e-4)."""

import torch

from fairseq_ext.cube.sharded_checkpoint import read_checkpoint
from tests.distributed.test_plan_run_sh import inner_records
from tests.helpers import MODEL_DIR, REPO
from tests.integration.test_run_sh import run_sh

SETTINGS = dict(
    USER_DIR=REPO / "tests" / "assets" / "my_ext",
    MODEL_ARCH="my_gru_lm",
    HUGGINGFACE_MODEL_NAME_OR_PATH=MODEL_DIR,
    MAX_STEPS=6,
    WARMUP_STEPS=1,
    BATCH_SIZE=4,
    SEQUENCE_LENGTH=64,
    EVALUATE=0,
    LOG_FORMAT="json",
    LOG_INTERVAL=1,
)


def _train(folder, **variables):
    result = run_sh(folder, args=["--hidden-size", "32"], **{**SETTINGS, **variables})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    log = result.stdout + (folder / "out" / "log" / "train.log").read_text()
    records = {step: (r["loss"], r["wpb"], r["bsz"]) for step, r in inner_records(result.stdout)}
    weights = read_checkpoint(str(folder / "out" / "checkpoint" / "checkpoint_last.pt"), optimizer=False)["model"]
    return records, weights, log


def test_user_model_trains_on_fairseq_ddp_with_zero1_as_one_process(tmp_path):
    one_records, one_weights, _ = _train(tmp_path / "one", NPROC_PER_NODE=1, GRADIENT_ACCU_NUM=2)
    records, weights, log = _train(tmp_path / "ddp", NPROC_PER_NODE=2, USE_ZERO=1)
    assert "ZeRO-1: optimizer states sharded among 2 replicas" in log and "FSDP2" not in log
    assert sorted(records) == sorted(one_records) == list(range(1, 7))
    for step, (loss, tokens, samples) in one_records.items():
        assert abs(float(records[step][0]) - float(loss)) <= 1.5e-3, (step, records[step], one_records[step])
        assert records[step][1:] == (tokens, samples), (step, records[step], one_records[step])
    assert float(one_records[6][0]) < float(one_records[1][0]) - 0.2, one_records  # it really trains
    assert weights.keys() == one_weights.keys()
    for name, value in one_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-4, msg=name)
