"""OPTIMIZER_STATES through run.sh on the CPU (no torchao needed): an unknown value and a precision whose master
weights low-bit states cannot keep stop the run in one line that says what to change."""

from tests.integration.test_run_sh import run_sh


def test_unknown_states_are_refused_by_run_sh(tmp_path):
    result = run_sh(tmp_path, OPTIMIZER_STATES="2bit")
    assert result.returncode != 0
    assert "OPTIMIZER_STATES must be precision, 8bit or 4bit, got '2bit'" in result.stderr, result.stderr[-2000:]


def test_master_weights_are_refused_before_training(tmp_path):
    result = run_sh(tmp_path, EVALUATE=0, MAX_STEPS=2, BATCH_SIZE=4, PRECISION="bf16-master", OPTIMIZER_STATES="8bit")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [
        "fairseq_ext: error: OPTIMIZER_STATES=8bit steps the weights as they are (stochastic rounding for bf16, no "
        "float32 master weights), but PRECISION=bf16-master keeps float32 master weights; use PRECISION=bf16-lean "
        "(or fp8-lean, fp32), or OPTIMIZER_STATES=precision"
    ], result.stderr[-3000:]
