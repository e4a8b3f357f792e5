"""A rank that stops taking part in collectives ends the run within COLLECTIVE_TIMEOUT and a short grace, with one
line naming that rank and the setting, and a non-zero exit (run.sh, 2 processes on gloo, the shipped tiny model).

The hang is injected by tests/assets/hung_rank (a --user-dir over fairseq_ext): rank 1 sleeps in its third update,
so rank 0 waits for it in that update's gradient all-reduce.
"""

import subprocess
import sys
import time

from fairseq_ext.cube.collective_timeout import MAX_GRACE_SECONDS, is_collective_timeout
from tests.helpers import REPO, RUN_SH, env
from tests.integration.test_run_sh import free_port

TIMEOUT = 5
# torchrun's stop of the other workers and run.sh's report, on a loaded 2-core machine
TEARDOWN_SECONDS = 30


def test_a_hung_rank_ends_the_run_naming_it_and_the_setting(tmp_path):
    settings = {
        "OUTPUT_DIR": str(tmp_path / "out"),
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "USER_DIR": str(REPO / "tests" / "assets" / "hung_rank"),
        "HUNG_RANK": "1",
        "HUNG_AT_UPDATE": "3",
        "COLLECTIVE_TIMEOUT": str(TIMEOUT),
        "NPROC_PER_NODE": "2",
        "MAX_STEPS": "100",
        "SAVE_STEPS": "100",
        "BATCH_SIZE": "2",
        "EVALUATE": "0",
        "LOG_INTERVAL": "1",
    }
    process = subprocess.Popen(
        ["bash", str(RUN_SH)],
        env={**env(), **settings},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        train_log = tmp_path / "out" / "log" / "train.log"
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if train_log.exists() and "num_updates=2," in train_log.read_text():
                break
            time.sleep(0.2)
        hung_since = time.time()  # the end of update 2: rank 1 is asleep in update 3
        _, stderr = process.communicate(timeout=300)
        waited = time.time() - hung_since
    finally:
        if process.poll() is None:
            process.kill()
    assert "num_updates=2," in train_log.read_text() and "num_updates=3," not in train_log.read_text()
    assert process.returncode != 0
    assert stderr.splitlines() == [
        f"fairseq_ext: error: rank 1 stopped answering: rank 0 waited for it in a collective operation for more than "
        f"{TIMEOUT} s (COLLECTIVE_TIMEOUT={TIMEOUT}); if ranks may wait that long on each other (one saves a large "
        f"checkpoint or prepares data while the others wait), raise COLLECTIVE_TIMEOUT; else the silent rank hung "
        f"(its last lines are in LOG_DIR/stderr_train.log)"
    ], stderr
    assert waited < TIMEOUT + MAX_GRACE_SECONDS + TEARDOWN_SECONDS, waited
    traceback = (tmp_path / "out" / "log" / "traceback.log").read_text()
    assert "Timed out waiting 5000ms" in traceback  # the gloo group got the setting, not torch's 30 minutes


def test_only_timeouts_are_explained_as_such():
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    try:
        try:
            raise timed_out
        except RuntimeError as err:
            raise ValueError("wrapped") from err
    except ValueError as wrapped:
        assert is_collective_timeout(wrapped)
    assert not is_collective_timeout(RuntimeError("Connection closed by peer"))
    assert not is_collective_timeout(ValueError("Timed out waiting"))
