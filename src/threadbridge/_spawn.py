"""How worker processes start: a fresh interpreter ("spawn"), a fork of the parent
("fork"), or a fork of a fork server ("forkserver", in ``_forkserver``)."""

from __future__ import annotations

import os
import subprocess
import time

from . import _locks
from ._forkserver import AVAILABLE as _FORKSERVER
from ._interpreter import python_command
from ._public import export

START_METHODS = ("spawn", "fork", "forkserver") if _FORKSERVER else ("spawn", "fork")
_start_method = "spawn"

_BOOT = "from threadbridge._in_worker import main; main()"


def current_method() -> str:
    return _start_method


def check_start_method(method: str) -> None:
    if method == "forkserver" and not _FORKSERVER:
        raise ValueError(
            'start method "forkserver" is not available here: it needs os.fork, '
            "os.waitid and socket.send_fds (Linux; macOS from Python 3.13); use "
            f"one of {START_METHODS}"
        )
    if method not in START_METHODS:
        raise ValueError(f"start method must be one of {START_METHODS}, got {method!r}")


def set_start_method(method: str) -> None:
    """Choose how new worker processes start.

    * ``"spawn"`` (the default): a fresh interpreter (fork and exec, or posix_spawn).
      Safe in a parent with threads; a cold start costs tens of milliseconds.
    * ``"fork"``: ``os.fork()`` of the parent, which then runs the worker loop. Starts in
      a few milliseconds, but forking a process that has threads can deadlock the child
      if another thread held a lock at that moment (Python 3.12+ warns about it). Use it
      only in a parent that runs no other threads of its own.
    * ``"forkserver"`` (Linux; macOS from Python 3.13): each pool starts a small server process (a
      fresh interpreter that imports the main script and what jobs have needed), and
      workers are forks of it: safe in a parent with threads, and a worker starts in a
      few milliseconds once the server is up.

    Workers already running keep the method they started with.

    Raises:
        ValueError: an unknown method.

    Args:
        method: ``"spawn"``, ``"fork"`` or ``"forkserver"``.

    Example:

        threadbridge.set_start_method("fork")  # before the first process call
    """
    global _start_method
    check_start_method(method)
    _start_method = method


class Forked:
    """The parts of subprocess.Popen that the pool uses, for a forked worker."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = _locks.Lock()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.returncode is not None:
                    return self.returncode
                flags = 0 if deadline is None else os.WNOHANG
                try:
                    pid, status = os.waitpid(self.pid, flags)
                except ChildProcessError:
                    # Reaped by someone else, or by the system itself (SIGCHLD ignored):
                    # it is gone, and how it ended is lost. Popen says 0 then; so do we.
                    self.returncode = 0
                    return 0
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    return self.returncode
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.005)


def start_worker(
    job_r: int, control_r: int, result_w: int, method: str | None = None
) -> subprocess.Popen[bytes] | Forked:
    """Start a worker process that leads its own session and process group, the way
    ``method`` says (None: the one ``set_start_method()`` chose)."""
    if (method or _start_method) == "fork":
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            from . import _in_worker

            _in_worker.after_fork(job_r, control_r, result_w)
        return Forked(pid)
    return subprocess.Popen(
        python_command(_BOOT, str(job_r), str(control_r), str(result_w)),
        pass_fds=(job_r, control_r, result_w),
        start_new_session=True,  # leads its own process group
        stdin=subprocess.DEVNULL,
    )


export(set_start_method)
