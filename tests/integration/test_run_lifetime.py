"""A run's lifetime through run.sh: one run per OUTPUT_DIR, a free port without MASTER_PORT, workers that
die with their launcher, and a run that stops when one of its workers dies.

Two 2-process runs are started side by side without MASTER_PORT while port 29500 (the old default) is
taken. Once both train: a second run on the first's OUTPUT_DIR stops at once naming it; a run given the
taken port says so in one line; one worker of the second run is killed, and that run stops and names it;
the first run's process group is killed (what a scheduler or a closed terminal does; torchrun's workers
live in sessions of their own), which ends its workers and releases the lock.
"""

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import RUN_SH, env
from tests.integration.test_run_sh import run_sh


def held_port(port: int):
    """A socket listening on ``port`` (None when something else already holds it: it is taken either way)."""
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        return busy
    except OSError:
        busy.close()
        return None


def start(tmp_path, name, settings):
    """run.sh in a session of its own (so that killpg reaches it and torchrun, as a scheduler's would)."""
    log = open(tmp_path / f"{name}.log", "w")
    process = subprocess.Popen(
        ["bash", str(RUN_SH)],
        env={**env(), **settings, "OUTPUT_DIR": str(tmp_path / name)},
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    return process


def wait_until_training(process, output_dir, timeout=300):
    train_log = output_dir / "log" / "train.log"
    deadline = time.time() + timeout
    while (
        process.poll() is None
        and time.time() < deadline
        and not (train_log.exists() and "num_updates" in train_log.read_text())
    ):
        time.sleep(0.5)
    assert process.poll() is None, (output_dir.parent / f"{output_dir.name}.log").read_text()[-3000:]


def worker_processes(launcher_pid):
    return [
        p
        for p in psutil.Process(launcher_pid).children(recursive=True)
        if "fairseq_cli.train" in " ".join(p.cmdline()) and "torch.distributed.run" not in p.cmdline()
    ]


def test_one_run_per_output_dir_free_port_and_workers_die_with_the_launcher(tmp_path):
    """Two 2-process runs side by side (both without MASTER_PORT): the first is killed as a whole, one
    worker of the second is killed alone."""
    busy = held_port(29500)
    settings = {
        "MASTER_PORT": "",
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
        "NPROC_PER_NODE": "2",
        "MAX_STEPS": "100000",
        "SAVE_STEPS": "100000",
        "BATCH_SIZE": "2",
        "EVALUATE": "0",
        "LOG_INTERVAL": "1",
    }
    first, other = start(tmp_path, "out", settings), start(tmp_path, "other", settings)
    workers = []
    try:
        wait_until_training(first, tmp_path / "out")
        wait_until_training(other, tmp_path / "other")

        second = run_sh(tmp_path, **{**settings, "NPROC_PER_NODE": "1"})
        assert second.returncode == 2 and len(second.stderr.splitlines()) == 1, second.stderr[-3000:]
        assert f"is in use by a run that is still alive (run.sh pid {first.pid} on" in second.stderr, second.stderr

        taken = run_sh(tmp_path / "third", **{**settings, "MASTER_PORT": "29500"})
        assert taken.returncode == 2 and len(taken.stderr.splitlines()) == 1, taken.stderr[-3000:]
        assert "MASTER_PORT 29500 is in use on this machine" in taken.stderr

        # one worker of the other run dies: the rest of that run stops, and run.sh names the worker
        others = worker_processes(other.pid)
        assert len(others) == 2
        workers += others
        rank = others[1].environ()["RANK"]
        others[1].kill()
        other.wait(timeout=120)
        assert other.returncode != 0
        report = (tmp_path / "other.log").read_text().splitlines()  # the dead worker, then what it caused
        assert len(report) <= 2 and f"a worker failed: rank: {rank}" in report[0], report
        assert "Signal 9 (SIGKILL)" in report[0], report
        _, alive = psutil.wait_procs(others, timeout=30)
        assert not alive

        workers[:] = worker_processes(first.pid)
        assert len(workers) == 2
        assert all(os.getsid(p.pid) != os.getsid(first.pid) for p in workers)  # out of reach of killpg
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers {[p.pid for p in alive]} outlived their launcher"
        with open(tmp_path / "out" / ".run-node0.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the operating system
    finally:
        for launcher in (first, other):
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
        for worker in workers:
            if worker.is_running():
                worker.kill()
        if busy is not None:
            busy.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_worker_killed_by_a_signal_is_named_with_or_without_torchrun(tmp_path, processes):
    """One process runs fairseq-train without torchrun, two under it: a worker killed by a signal is reported
    the same way (torchrun's report of its first failure), run.sh exits 1."""
    user_dir = tmp_path / "killed"
    user_dir.mkdir()
    (user_dir / "__init__.py").write_text("import os\nimport signal\n\nos.kill(os.getpid(), signal.SIGKILL)\n")
    result = run_sh(tmp_path, USER_DIR=user_dir, NPROC_PER_NODE=processes, EVALUATE=0)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.sh: error: a worker failed: rank: "), lines
    assert "exitcode: -9" in lines[0] and "Signal 9 (SIGKILL)" in lines[0], lines
    assert lines[0].endswith(f"the full output is in {tmp_path}/out/log/stderr_train.log"), lines
