"""--precision bf16: the forward under bfloat16 autocast, weights and optimizer states kept in fp32;
bf16-master / bf16-lean: bf16 weights, with float32 master weights in the optimizer or without."""

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.cube.runtime.precision import check_precision
from fairseq_ext.errors import UserInputError
from tests.helpers import fairseq_train, tiny_train_args, train_losses


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    """Per-update losses of the fp32 run every bf16 run here is compared with (the same command for each)."""
    result = fairseq_train(
        tiny_train_args(tmp_path_factory.mktemp("fp32"), max_update=6, extra=["--precision", "fp32", "--lr", "3e-3"])
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(result.stdout)


def test_bf16_autocast_trains_fp32_weights_close_to_fp32(tmp_path, fp32_losses):
    result = fairseq_train(
        tiny_train_args(tmp_path / "bf16", max_update=6, extra=["--precision", "bf16", "--lr", "3e-3"])
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fp32, bf16 = fp32_losses, train_losses(result.stdout)
    assert bf16[1] == pytest.approx(fp32[1], rel=2e-2) and bf16[1] != fp32[1]  # same start, bf16 rounding
    assert bf16[6] < bf16[1] - 0.5, bf16
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "bf16" / "checkpoint_last.pt"))
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert state["cfg"].task.precision == "bf16"


@pytest.mark.parametrize("precision", ["bf16-master", "bf16-lean"])
def test_bf16_weights_train_close_to_fp32_and_resume(tmp_path, precision, fp32_losses):
    """bf16 weights in the model and checkpoint, the optimizer's float32 master weights (bf16-master) or
    bf16 moments (bf16-lean) in the checkpoint's optimizer state; the run resumes from it."""
    args = ["--precision", precision, "--lr", "3e-3", "--optimizer", "torch_adamw"]
    run = fairseq_train(tiny_train_args(tmp_path / precision, max_update=6, extra=args))
    assert run.returncode == 0, run.stderr[-3000:]
    fp32, bf16 = fp32_losses, train_losses(run.stdout)
    assert bf16[1] == pytest.approx(fp32[1], rel=2e-2)
    assert bf16[6] < bf16[1] - 0.5 and bf16[6] == pytest.approx(fp32[6], rel=5e-2), (bf16, fp32)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / precision / "checkpoint_last.pt"))
    # fairseq writes bf16 tensors as float32: the weights are bf16 values, the master weights are not
    assert all(torch.equal(v, v.bfloat16().float()) for v in state["model"].values())
    optimizer_state = state["last_optimizer_state"]["state"].values()
    assert all(
        set(s)
        == (
            {"step", "exp_avg", "exp_avg_sq", "master"}
            if precision == "bf16-master"
            else {"step", "exp_avg", "exp_avg_sq"}
        )
        for s in optimizer_state
    )
    if precision == "bf16-master":
        assert any(not torch.equal(s["master"], s["master"].bfloat16().float()) for s in optimizer_state)
    resumed = fairseq_train(tiny_train_args(tmp_path / precision, max_update=8, extra=args))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(train_losses(resumed.stdout)) == [7, 8]


def test_bf16_weights_need_torch_adamw(tmp_path):
    result = fairseq_train(
        tiny_train_args(tmp_path, max_update=2, extra=["--precision", "bf16-master", "--optimizer", "adam"])
    )
    assert result.returncode != 0
    assert "PRECISION=bf16-master keeps bf16 weights and needs --optimizer torch_adamw" in result.stderr


@pytest.mark.parametrize(
    "precision, flags, message",
    [
        ("bf8", {}, r"unknown precision 'bf8'; choose one of fp32, bf16"),
        ("bf16", {"fp16": True}, r"drop --fp16/--bf16"),
    ],
)
def test_bad_precision_settings(precision, flags, message):
    with pytest.raises(UserInputError, match=message):
        check_precision(precision, **flags)
