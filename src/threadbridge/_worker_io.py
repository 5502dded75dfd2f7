"""Small pieces of talking to worker processes: how one ended, in words; a frame to it
that never raises SIGPIPE; whether a descriptor is ready."""

from __future__ import annotations

import os
import select
import signal
from typing import Any

from . import _signals, _wire
from ._errors import WorkerCrashed
from ._forkserver import ForkServed


def how_it_ended(
    proc: object, returncode: int | None, when: str = "without answering"
) -> tuple[str, int | None, int | None]:
    """How a process of ours (a worker, a fork server) that ended by itself did (``when``
    it did): words for an error, its signal, its exit code."""
    if returncode is None:
        return f"died {when}", None, None
    if returncode == 0 and exit_status_discarded(proc):
        return (
            f"exited {when}; how it ended is unknown: SIGCHLD is ignored in this process, "
            "so the system discards its children's exit statuses (restore it with "
            "signal.signal(signal.SIGCHLD, signal.SIG_DFL) to learn the exit code or signal)",
            None,
            None,
        )
    if returncode < 0:
        signum = -returncode
        try:
            signame = signal.Signals(signum).name
        except ValueError:  # pragma: no cover
            signame = str(signum)
        return f"was killed by {signame} {when}", signum, None
    return f"exited with code {returncode} {when}", None, returncode


def startup_error(
    proc: Any, returncode: int | None, then: str, initializer: str | None
) -> WorkerCrashed:
    """What a worker that ended before it was ready tells the call it had, ``then``
    ("before it could run f"), and its pool, which stops starting workers that cannot
    start. ``initializer``: the pool's initializer ran, and ended the process."""
    pid = proc.pid
    if initializer is not None:
        how, signum, exitcode = how_it_ended(proc, returncode, "in it")
        message = (
            f"the ProcessPool's initializer {initializer} ended its worker process (pid "
            f"{pid}) {then}: the worker {how}. An initializer must return (or raise, to "
            "fail the pool with its error); it must not exit the process"
        )
    else:
        how, signum, exitcode = how_it_ended(proc, returncode, "while starting")
        message = (
            f"the worker process (pid {pid}) {how}, {then}: it could not start (its "
            "standard error says why: an interpreter that cannot run, the main script or "
            "a package that fails to import, the process killed from outside)"
        )
    return WorkerCrashed(message, signal=signum, exitcode=exitcode, pid=pid)


def exit_status_discarded(proc: object) -> bool:
    """Whether the system reaps this process itself, keeping no exit status: a child of a
    process that ignores SIGCHLD (a fork server's workers are its children, not ours)."""
    if isinstance(proc, ForkServed):
        return False
    return signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN


def write_frame(fd: int, kind: int, job: int = 0, payload: bytes = b"") -> None:
    """A frame to a worker. Never raises SIGPIPE, even in a program that has restored its
    default action (CLI tools do): a dead worker is a BrokenPipeError, handled here."""
    if _signals.getsignal(signal.SIGPIPE) == signal.SIG_IGN:  # Python's default
        _wire.write_frame(fd, kind, job, payload)
        return
    pipe = {signal.SIGPIPE}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, pipe)
    try:
        _wire.write_frame(fd, kind, job, payload)
    except BrokenPipeError:
        # The SIGPIPE now pending for this thread: drop it (macOS has no sigtimedwait,
        # and sigwait returns at once for a signal that is pending).
        if hasattr(signal, "sigtimedwait"):
            signal.sigtimedwait(pipe, 0)
        elif signal.SIGPIPE in signal.sigpending():
            signal.sigwait(pipe)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ready(fd: int, timeout: float = 0.0) -> bool:
    """Whether reading ``fd`` would not block (data, end of file, or a process descriptor
    whose process has exited), waiting up to ``timeout`` seconds. poll(), not select():
    select() cannot take a descriptor numbered 1024 or more, and a busy service's pipes
    may well be numbered so."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
