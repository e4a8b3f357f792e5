"""benchmarks/fp8_loss_curve.py's arithmetic: run names, the gaps between two curves and the tolerance that a
second seed of the reference precision widens."""

import sys

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import fp8_loss_curve  # noqa: E402


def test_a_run_is_a_precision_and_a_seed():
    assert fp8_loss_curve.parse_run("bf16-master") == ("bf16-master", 1)
    assert fp8_loss_curve.parse_run("bf16-master@2") == ("bf16-master", 2)


def test_the_gaps_are_relative_to_the_reference_and_signed_on_average():
    reference = [2.0] * 40
    lower = [2.0] * 20 + [1.9] * 20  # 5% lower over the last 20 updates
    c = fp8_loss_curve.compare(reference, lower, window=20)
    assert c["final_gap"] == pytest.approx(0.05) and c["max_moving_gap"] == pytest.approx(0.05)
    assert c["mean_signed_gap"] < 0 and c["final_other"] == pytest.approx(1.9)


def test_another_seed_widens_the_tolerance_and_never_narrows_it():
    reference = [2.0] * 40
    assert fp8_loss_curve.tolerance(reference, []) == (fp8_loss_curve.MAX_RELATIVE, fp8_loss_curve.FINAL_RELATIVE)
    far = [2.0] * 20 + [2.1] * 20  # a second seed 5% higher at the end
    assert fp8_loss_curve.tolerance(reference, [far]) == pytest.approx((0.05, 0.05))
    near = [2.0] * 40
    assert fp8_loss_curve.tolerance(reference, [near]) == (fp8_loss_curve.MAX_RELATIVE, fp8_loss_curve.FINAL_RELATIVE)


def test_an_earlier_calls_other_seed_of_the_reference_widens_the_tolerance(tmp_path):
    csv_path = tmp_path / "losses.csv"
    csv_path.write_text("update,bf16-master,bf16-master@2,fp8\n1,3.0,3.1,2.9\n2,2.0,2.1,1.9\n")
    earlier = fp8_loss_curve.read_losses(csv_path)
    assert earlier == {"bf16-master": [3.0, 2.0], "bf16-master@2": [3.1, 2.1], "fp8": [2.9, 1.9]}
    # reference bf16-master@2: the earlier seed-1 run measures the spread, not the same run or another precision
    names = ["bf16-master@2", "fp8@2"]
    assert fp8_loss_curve.other_seeds("bf16-master@2", names, earlier, steps=2) == ["bf16-master (earlier)"]
    assert fp8_loss_curve.other_seeds("bf16-master@2", names, earlier, steps=3) == []  # other lengths: other settings
    three = ["bf16-master", "bf16-master@3", "fp8"]
    assert fp8_loss_curve.other_seeds("bf16-master", three, earlier, steps=2) == [
        "bf16-master@3",
        "bf16-master@2 (earlier)",
    ]


RUN28 = REPO / "benchmarks" / "results" / "fp8_loss_curve"


def test_the_summary_reproduces_run_28s_committed_comparison():
    losses = fp8_loss_curve.read_losses(RUN28 / "losses.csv")
    names = ["bf16-master", "bf16-master@2", "fp8"]
    committed = (RUN28 / "fp8_loss_curve.md").read_text().splitlines()[2:]
    assert fp8_loss_curve.summarize(losses, names, {}, steps=320) == committed


def test_a_call_of_two_runs_takes_the_other_seed_from_the_earlier_call():
    earlier = fp8_loss_curve.read_losses(RUN28 / "losses.csv")
    losses = {"bf16-master@2": earlier["bf16-master@2"], "fp8@2": earlier["fp8"]}  # as if this call ran these two
    lines = fp8_loss_curve.summarize(losses, ["bf16-master@2", "fp8@2"], earlier, steps=320)
    assert "- bf16-master (earlier) against bf16-master@2: mean of the last 20 updates 2.0179 / 1.9558" in "\n".join(
        lines
    )
    assert "- bf16-master@2 against the same run in the earlier call: final gap 0.00%" in "\n".join(lines)
    assert "and the gaps of bf16-master (earlier) other-seed run)" in lines[-2]
