"""A torchrun worker dies with its launcher.

torchrun starts each worker in a session of its own, so killing the launcher's process group (a closed
terminal, a scheduler's ``kill -9``) leaves the workers running, training and writing checkpoints,
reparented to init. :func:`die_with_launcher` asks Linux to send the worker SIGTERM when its parent (the
torchrun agent) exits, however it exits (``prctl(PR_SET_PDEATHSIG)``).
"""

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_launcher() -> bool:
    """Under torchrun on Linux: have this process receive SIGTERM when the launcher dies; True when set."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the request: nothing would send the signal
        os.kill(os.getpid(), signal.SIGTERM)
    return True
