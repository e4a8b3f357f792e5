"""A run's lifetime through run.sh: one run per OUTPUT_DIR, a free port without MASTER_PORT, and workers
that die with their launcher.

One 2-process run is started without MASTER_PORT while port 29500 (the old default) is taken; once it
trains, a second run on its OUTPUT_DIR stops at once naming it, a run given the taken port says so in one
line, and killing the first run's process group (what a scheduler or a closed terminal does; torchrun's
workers live in sessions of their own) ends its workers and releases the lock.
"""

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

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


def test_one_run_per_output_dir_free_port_and_workers_die_with_the_launcher(tmp_path):
    busy = held_port(29500)
    settings = {"OUTPUT_DIR": str(tmp_path / "out"), "MASTER_PORT": "", "PYTHON": sys.executable,
                "CUDA_VISIBLE_DEVICES": "", "NPROC_PER_NODE": "2", "MAX_STEPS": "100000", "SAVE_STEPS": "100000",
                "BATCH_SIZE": "2", "EVALUATE": "0", "LOG_INTERVAL": "1"}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(["bash", str(RUN_SH)], env={**env(), **settings}, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    workers = []
    try:
        train_log = tmp_path / "out" / "log" / "train.log"
        deadline = time.time() + 300
        while first.poll() is None and time.time() < deadline and \
                not (train_log.exists() and "num_updates" in train_log.read_text()):
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]

        second = run_sh(tmp_path, **{**settings, "NPROC_PER_NODE": "1"})
        assert second.returncode == 2 and len(second.stderr.splitlines()) == 1, second.stderr[-3000:]
        assert f"is in use by a run that is still alive (run.sh pid {first.pid} on" in second.stderr

        taken = run_sh(tmp_path / "other", **{**settings, "MASTER_PORT": "29500"})
        assert taken.returncode == 2 and len(taken.stderr.splitlines()) == 1, taken.stderr[-3000:]
        assert "MASTER_PORT 29500 is in use on this machine" in taken.stderr

        workers[:] = [p for p in psutil.Process(first.pid).children(recursive=True)
                      if "fairseq_cli.train" in " ".join(p.cmdline()) and "torch.distributed.run" not in p.cmdline()]
        assert len(workers) == 2
        assert all(os.getsid(p.pid) != os.getsid(first.pid) for p in workers)  # out of reach of killpg
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers {[p.pid for p in alive]} outlived their launcher"
        with open(tmp_path / "out" / ".run-node0.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the operating system
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for worker in workers:
            if worker.is_running():
                worker.kill()
        if busy is not None:
            busy.close()
        log.close()
