"""The worker process's own signal state, which every job starts with.

A target that blocks SIGTERM, installs a handler or has SIGTERM restart system calls must
not disable rung 2 (or the worker's own SIGINT and SIGPIPE settings) for the jobs after
it: ``save()`` once the worker has set them, ``restore()`` after each job.
"""

from __future__ import annotations

import signal
from typing import Any

from . import _signals

# Only the signals the worker relies on are checked, and read through _signals: this
# runs on every job's path.
_OWN_SIGNALS = tuple(
    int(getattr(signal, name))
    for name in ("SIGTERM", "SIGINT", "SIGPIPE")
    if hasattr(signal, name)  # no SIGPIPE on Windows, where this module is only imported
)
_base_mask: set[int] = set()
_base_handlers: dict[int, Any] = {}


def save() -> None:
    global _base_mask
    _base_mask = set(_signals.pthread_sigmask(signal.SIG_BLOCK, ()))
    for signum in _OWN_SIGNALS:
        _base_handlers[signum] = _signals.getsignal(signum)


def restore() -> None:
    if _signals.pthread_sigmask(signal.SIG_BLOCK, ()) != _base_mask:
        _signals.pthread_sigmask(signal.SIG_SETMASK, _base_mask)
    for signum, handler in _base_handlers.items():
        if _signals.getsignal(signum) != handler:
            signal.signal(signum, handler)
    global _restarts_touched
    if _restarts_touched:
        # signal.siginterrupt(SIGTERM, False) leaves the handler as it is, but has the
        # system restart a call that SIGTERM interrupts (SA_RESTART): a read, a lock, a
        # recv would then never return to let rung 2 land.
        _restarts_touched = False
        _siginterrupt(signal.SIGTERM, True)


# Whether a target has called signal.siginterrupt() since the last job: only then is
# SIGTERM's SA_RESTART flag set back (a sigaction on every job's path costs its latency
# about 4 us; nothing else tells cheaply whether a target changed it). A call through C
# (ctypes' sigaction, an extension) is not seen: docs/processes.md says so.
_restarts_touched = False
# Absent on Windows, where this module is only imported (no worker runs there).
_siginterrupt: Any = getattr(signal, "siginterrupt", None)


def _noting_siginterrupt(signalnum: int, flag: bool, /) -> None:
    global _restarts_touched
    _restarts_touched = True
    _siginterrupt(signalnum, flag)


_noting_siginterrupt.__doc__ = getattr(_siginterrupt, "__doc__", None)


def watch_siginterrupt() -> None:
    """Have the worker's targets call signal.siginterrupt() through _noting_siginterrupt
    (also those that import it by name: they do so after the worker has started)."""
    signal.siginterrupt = _noting_siginterrupt
