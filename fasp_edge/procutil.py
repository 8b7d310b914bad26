"""Child processes that do not outlive the fasp-edge process that started them.

Exports (``fasp-edge run``) and measurements (``fasp-edge bench``) run in child processes. A Ctrl-C in the
terminal reaches them through the process group; a parent killed outright (SIGKILL, out-of-memory killer)
would leave them running, competing for the CPU with the next run. On Linux, :func:`die_with_parent`
(a ``preexec_fn``) asks the kernel to SIGKILL the child when its parent dies.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# looked up once, in the parent: a preexec_fn runs between fork and exec, where loading a library could
# deadlock on a lock another thread of the parent held at fork time
_PRCTL = _load_prctl()


def die_with_parent_fn():
    """A ``preexec_fn`` for ``subprocess.Popen`` (None where the platform has no parent-death signal).

    The signal is tied to the thread that starts the child; callers keep that thread waiting on the child
    (``Popen.wait``) for the child's whole life."""
    if _PRCTL is None or os.name != "posix":
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec
