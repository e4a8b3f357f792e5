"""Errors as one clear line and a non-zero exit instead of a traceback.

:class:`UserInputError` is bad input (a file, a flag, an environment variable); its message says what to
change. Any other exception that reaches the top of a process is unexpected: with ``FAIRSEQ_EXT_LOG_DIR``
set (run.sh sets it to LOG_DIR) its traceback goes to ``traceback.log`` there and the terminal gets one
line naming that file; without it, Python's traceback is printed as usual.
"""

import fcntl
import os
import sys
import traceback
from typing import Callable, List, Optional

PREFIX = "fairseq_ext: error:"
LOG_DIR_VARIABLE = "FAIRSEQ_EXT_LOG_DIR"
TRACEBACK_FILE = "traceback.log"
# functions that explain a known kind of failure in one line (or return None), asked before it counts as unexpected
_explainers: List[Callable[[BaseException], Optional[str]]] = []


class UserInputError(ValueError):
    """Bad input from the user (a file, a flag, an environment variable); the message says what to change."""


def keep_traceback(exc_type, exc, tb, log_dir: str) -> str:
    """Append the traceback to ``log_dir``/traceback.log (one block per process, headed by its rank and pid);
    returns the file's path."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, TRACEBACK_FILE)
    header = f"---- rank {os.environ.get('RANK', '0')}, pid {os.getpid()}: {' '.join(sys.argv)}\n"
    with open(path, "a", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # the workers of one run share the file
        file.write(header + "".join(traceback.format_exception(exc_type, exc, tb)))
    return path


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, the message cut to its first sentence when long."""
    text = " ".join(str(exc).split())
    if len(text) > 160:
        text = text.split(". ")[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def explain_with(explainer: Callable[[BaseException], Optional[str]]) -> None:
    """Have ``explainer`` turn the exceptions it knows into one line (the traceback still goes to the log)."""
    if explainer not in _explainers:
        _explainers.append(explainer)


def _explained(exc: BaseException) -> Optional[str]:
    for explainer in _explainers:
        message = explainer(exc)
        if message:
            return message
    return None


def _excepthook(exc_type, exc, tb, _default=sys.excepthook):
    if issubclass(exc_type, UserInputError):
        print(f"{PREFIX} {exc}", file=sys.stderr, flush=True)
        return
    log_dir = os.environ.get(LOG_DIR_VARIABLE)
    explained = _explained(exc)
    if explained:
        if log_dir:
            try:
                keep_traceback(exc_type, exc, tb, log_dir)
            except OSError:
                pass
        print(f"{PREFIX} {explained}", file=sys.stderr, flush=True)
        return
    if not log_dir or issubclass(exc_type, KeyboardInterrupt):
        _default(exc_type, exc, tb)
        return
    try:
        path = keep_traceback(exc_type, exc, tb, log_dir)
    except OSError:
        _default(exc_type, exc, tb)
        return
    print(f"{PREFIX} unexpected {one_line(exc)} (the full traceback is in {path})", file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """Print :class:`UserInputError` as one line, other errors as one line naming their traceback's file under
    ``FAIRSEQ_EXT_LOG_DIR`` (exit status stays 1)."""
    sys.excepthook = _excepthook
