"""How long a rank waits in a collective operation for the others, and the one line when one stopped answering.

fairseq's ``distributed_init`` creates the process group without a timeout, and torch gives every group created
without one its backend's default (gloo 30 min, NCCL 10 min): the world group, fairseq's own group, the
DeviceMesh's and ZeRO's groups. :func:`set_default_timeout` makes ``--collective-timeout`` (run.sh:
COLLECTIVE_TIMEOUT) the timeout of every group this process creates afterwards, on every backend.

When a collective times out and the waiting ranks get the error (gloo raises it; with NCCL, torch's watchdog may
end the process first, and run.sh then names the worker and its signal), each rank that waited says so in the
job's store and gives the others a short while to do the same; the ranks that did not are
the ones that stopped answering. Every waiting rank then prints the same line (run.sh folds duplicates),
naming them and the setting to change.
"""

import datetime
import logging
import time
from typing import Iterable, List, Optional

import torch.distributed as dist
from torch.distributed import distributed_c10d

DEFAULT_SECONDS = 1800
SETTING = "COLLECTIVE_TIMEOUT"
# what torch and its backends say when a collective waited past its group's timeout
TIMEOUT_MESSAGES = ("Timed out waiting", "Watchdog caught collective operation timeout", "operation timed out")
REPORT_KEY = "fairseq_ext/collective_timeout/rank{}"
MAX_GRACE_SECONDS = 10.0

logger = logging.getLogger(__name__)
_timeout_seconds: Optional[float] = None


def set_default_timeout(seconds: float) -> None:
    """Every process group created from now on (without a timeout of its own) times out after ``seconds``."""
    global _timeout_seconds
    timeout = datetime.timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    _timeout_seconds = seconds


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a collective operation that timed out."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RuntimeError) and any(message in str(exc) for message in TIMEOUT_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _ranks(ranks: Iterable[int]) -> str:
    ranks = sorted(ranks)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def silent_ranks(rank: int, world_size: int, grace: float) -> Optional[List[int]]:
    """Reports this rank's timeout in the job's store and waits up to ``grace`` seconds for the others to report
    theirs; returns the ranks that did not (None when the store cannot be reached)."""
    try:
        store = distributed_c10d._get_default_store()
        store.set(REPORT_KEY.format(rank), "1")
        deadline = time.monotonic() + grace
        while True:
            silent = [r for r in range(world_size) if not store.check([REPORT_KEY.format(r)])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.2)
    except Exception as err:  # the store's host may be gone too; the message then names no rank
        logger.warning(f"could not ask the other ranks which stopped answering: {err}")
        return None


def timeout_message(exc: BaseException) -> Optional[str]:
    """The one-line explanation of a collective that timed out, naming the ranks that stopped answering and
    the setting to change; None for any other error."""
    if not is_collective_timeout(exc):
        return None
    seconds = _timeout_seconds if _timeout_seconds is not None else distributed_c10d.default_pg_timeout.total_seconds()
    where = ""
    if dist.is_initialized():
        world_size = dist.get_world_size()
        silent = silent_ranks(dist.get_rank(), world_size, min(MAX_GRACE_SECONDS, seconds))
        if silent:
            waited = sorted(set(range(world_size)) - set(silent))
            where = f"{_ranks(silent)} stopped answering: {_ranks(waited)} waited for it in a collective operation"
        elif silent == []:
            where = "every rank waited in a collective operation that the others did not join (mismatched collectives)"
    where = where or "a rank stopped answering in a collective operation"
    return (
        f"{where} for more than {seconds:g} s ({SETTING}={seconds:g}); if ranks may wait that long on each other "
        f"(one saves a large checkpoint or prepares data while the others wait), raise {SETTING}; else the "
        f"silent rank hung (its last lines are in LOG_DIR/stderr_train.log)"
    )
