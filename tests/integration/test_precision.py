"""--precision bf16: the forward under bfloat16 autocast, weights and optimizer states kept in fp32."""

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.cube.runtime.precision import check_precision
from fairseq_ext.errors import UserInputError
from tests.helpers import fairseq_train, tiny_train_args, train_losses


def test_bf16_autocast_trains_fp32_weights_close_to_fp32(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        result = fairseq_train(tiny_train_args(tmp_path / precision, max_update=6,
                                               extra=["--precision", precision, "--lr", "3e-3"]))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[precision] = train_losses(result.stdout)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16[1] == pytest.approx(fp32[1], rel=2e-2) and bf16[1] != fp32[1]  # same start, bf16 rounding
    assert bf16[6] < bf16[1] - 0.5, bf16
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "bf16" / "checkpoint_last.pt"))
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert state["cfg"].task.precision == "bf16"


@pytest.mark.parametrize("precision, flags, message", [
    ("bf8", {}, r"unknown precision 'bf8'; choose one of fp32, bf16"),
    ("bf16", {"fp16": True}, r"drop --fp16/--bf16"),
])
def test_bad_precision_settings(precision, flags, message):
    with pytest.raises(UserInputError, match=message):
        check_precision(precision, **flags)
