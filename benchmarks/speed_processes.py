"""Processes of the speed benchmarks: one command run with its output in a log and a timeout; on timeout the
command and every process it started are ended."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List

# the folder every command runs in, and the script of our runs
REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "cube_examples" / "finetune_hf_model" / "run.sh"


def descendants(pid: int) -> List[int]:
    """Process ids below ``pid`` (children, grandchildren...), read from /proc. torchrun starts its workers
    in new sessions, so ending the process group alone would leave them on the GPU."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def end_tree(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the process and its descendants (torchrun then stops its workers); SIGKILL what still runs
    after ``grace_s``."""
    pids = [proc.pid] + descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and (proc.poll() is None or any(alive(pid) for pid in pids[1:])):
            time.sleep(0.1)
        pids = [pid for pid in pids if alive(pid)]
        if not pids:
            break
    proc.wait()


def run_logged(cmd: List[str], env: dict, log: Path, timeout: float, header: str = "") -> dict:
    """Run ``cmd`` with stdout and stderr into ``log``; return {'rc', 'timed_out', 'wall_s'}."""
    start = time.time()
    Path(log).write_text(header)
    with open(log, "a") as f:  # O_APPEND: the child's lines and ours both land at the end
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            end_tree(proc)
            rc, timed_out = proc.returncode, True
            f.write(f"\n[single_gpu_speed] killed after the {timeout:.0f} s timeout\n")
    return {"rc": rc, "timed_out": timed_out, "wall_s": time.time() - start}


def free_port() -> int:
    """A TCP port free on this machine now (MASTER_PORT of a run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
