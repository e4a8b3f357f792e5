"""run.sh against faults and bad input: a finished run stays finished (full and sharded checkpoints), and
every bad input ends in a few lines with a non-zero exit, leaving an earlier finished run's files as they were.

Two tiny finished runs (2 updates each, one per checkpoint format) are made once for the module; every
test then starts run.sh again on them, or beside them, and compares their files byte by byte.
"""

import hashlib
import shutil

import pytest

from tests.integration.test_run_sh import run_sh

SETTINGS = {"MAX_STEPS": 2, "SAVE_STEPS": 1, "BATCH_SIZE": 4, "EVALUATE": 0, "LOG_INTERVAL": 1}


def digests(folder):
    """{relative path: sha256} of every file under ``folder``."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """{checkpoint format: the folder holding run.sh's OUTPUT_DIR ``out``} of two finished runs."""
    runs = {}
    for checkpoint_format in ("full", "dcp"):
        folder = tmp_path_factory.mktemp(checkpoint_format)
        result = run_sh(folder, CHECKPOINT_FORMAT=checkpoint_format, **SETTINGS)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        runs[checkpoint_format] = folder
    return runs


def test_a_finished_run_stays_finished(finished, tmp_path):
    for checkpoint_format, folder in finished.items():
        before = digests(folder / "out" / "checkpoint")
        assert any(name.endswith(".dcp/.metadata") for name in before) == (checkpoint_format == "dcp"), before
        again = run_sh(folder, CHECKPOINT_FORMAT=checkpoint_format, **SETTINGS)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "the run is complete: " in again.stdout and "is at update 2 and --max-update (MAX_STEPS) is 2" \
            in again.stdout, again.stdout[-3000:]
        assert "train_inner" not in again.stdout and "Saved checkpoint" not in again.stdout
        assert digests(folder / "out" / "checkpoint") == before, checkpoint_format

    shutil.copytree(finished["full"] / "out", tmp_path / "out")
    more = run_sh(tmp_path, CHECKPOINT_FORMAT="full", **{**SETTINGS, "MAX_STEPS": 3})
    assert more.returncode == 0, more.stderr[-3000:]
    assert "the run is complete" not in more.stdout
    assert "num_updates 3" in more.stdout.replace("=", " ") and "num_updates 2 " not in more.stdout.replace("=", " ")
