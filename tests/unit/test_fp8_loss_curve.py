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
