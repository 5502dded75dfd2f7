"""Inside the Ray task: the target runs on this Ray worker's target host.

Rung 1 and rung 2 come from the driver's control actor, which a watcher thread of this
worker listens to while a task runs; rung 2 is SIGUSR2 to the task's thread. Ray's own
cancel (``ray.cancel(ref)``) comes as SIGINT, which is rung 1 here, never an exception.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from types import FrameType
from typing import Any

from .. import _locks
from .._host import Host, HostedJob
from ._control import GONE, INTERRUPT, STOP, find_control
from ._lib import ray

logger = logging.getLogger("threadbridge")

# The signal that carries rung 2 to the task's thread. Ray leaves it alone; its default
# action would end the worker, so the handler, once installed, stays (it does nothing
# when no threadbridge target runs). Windows has none; RayBackend refuses it there.
RUNG2_SIGNAL: int = getattr(signal, "SIGUSR2", 0)
_WAIT = 5.0  # seconds a watcher's wait on the control actor lasts before it asks again
# A task's watcher tells the control actor where the task runs after _PLACE_DELAY, and
# first waits on it after _QUIET_START (both at once when Ray's own cancel reaches the
# task): a short task costs no actor call at all. A target that waits in sleep() within
# _QUIET_START sees rung 1 at most this late.
_PLACE_DELAY = 0.002
_QUIET_START = 0.02


class _RemoteJob:
    """One task's job: its hosted job, and what its watcher waits on."""

    __slots__ = ("control", "ended", "hosted", "wake")

    def __init__(self, control: str, hosted: HostedJob) -> None:
        self.control = control  # the control actor's name
        self.hosted = hosted
        self.wake = threading.Event()  # Ray's own cancel arrived: the watcher starts now
        self.ended = threading.Event()  # the target has returned (or never will start)


_host: Host | None = None
_current: _RemoteJob | None = None
_previous_sigint: Any = None
_install_lock = _locks.Lock()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Ray's own cancel (``ray.cancel(ref)``) raises KeyboardInterrupt in the task through
    the SIGINT handler: for a threadbridge target that is rung 1, never an exception."""
    job = _current
    if job is not None:
        # The handler runs in the task's thread, between any two bytecodes: perhaps
        # while that thread holds a lock that setting the token (or an Event) takes,
        # inside Token.wait() or sleep(). So it takes none: SimpleQueue.put() is safe
        # here, and the relay thread sets the token.
        _relayed.put(job)
        return
    previous = _previous_sigint
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt


_relayed: queue.SimpleQueue[_RemoteJob] = queue.SimpleQueue()


def _relay() -> None:
    """Rung 1 from Ray's own cancel, set outside the signal handler (see _on_sigint)."""
    while True:
        job = _relayed.get()
        job.hosted.state._set()
        job.wake.set()  # its watcher starts now, if it has not yet


def host() -> Host:
    """This Ray worker's target host, with its handlers installed (in the task's thread,
    which Ray runs in the worker's main thread)."""
    global _host, _previous_sigint
    with _install_lock:
        if _host is None:
            threading.Thread(target=_relay, name="threadbridge-ray-rung1", daemon=True).start()
            _previous_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, _on_sigint)
            made = Host(
                RUNG2_SIGNAL,
                where="in a Ray task",
                loads=ray.cloudpickle.loads,
                host_name="the Ray task",
            )
            made.install()
            _host = made
        return _host


# One watcher thread per Ray worker process, for the job it runs now (Ray runs one task at
# a time in a worker): starting a thread per task would cost more than the task.
_watcher_jobs: queue.SimpleQueue[_RemoteJob] = queue.SimpleQueue()
_watcher_lock = _locks.Lock()
_watcher: threading.Thread | None = None


def _hand_to_watcher(job: _RemoteJob) -> None:
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = threading.Thread(
                target=_watch_jobs, name="threadbridge-ray-watcher", daemon=True
            )
            _watcher.start()
    _watcher_jobs.put(job)


def _watch_jobs() -> None:
    while True:
        job = _watcher_jobs.get()
        try:
            _watch(job)
        except Exception:  # pragma: no cover - never let the watcher die
            logger.exception("threadbridge's Ray watcher failed")


def _watch(job: _RemoteJob) -> None:
    """Listen for the job's rungs on the control actor (in the watcher thread)."""
    job.wake.wait(_PLACE_DELAY)
    if job.ended.is_set():
        return  # a short task: no actor call at all
    job_id = job.hosted.id
    try:
        control = find_control(job.control)
        # Where the task runs, for rung 3 to wait until this process is gone. Sent
        # early, without waiting for an answer: a task may be killed long before its
        # watcher would first wait on the actor.
        control.started.remote(job_id, (os.getpid(), ray.get_runtime_context().get_node_id()))
    except Exception:  # the driver is gone, and its actor
        return
    job.wake.wait(_QUIET_START - _PLACE_DELAY)
    seen = 0
    while not job.ended.is_set():
        try:
            level, asked = ray.get(control.wait.remote(job_id, seen, _WAIT))
        except Exception:  # the driver is gone, or the actor: the task will be too
            return
        if level == GONE or job.ended.is_set():
            return
        if asked:  # RunningTarget.where() in the driver
            control.tell_where.remote(job_id, host().where_now(job_id))
        if level >= STOP:
            host().stop(job_id)
        if level >= INTERRUPT:  # levels only rise: after it, only GONE comes
            hosted = host().interrupt(job_id)
            if hosted is not None:
                found = hosted.where
                if found is not None:
                    # Told at once: a task killed at rung 3 sends no answer to carry it.
                    control.said_where.remote(job_id, (found.line, found.stack()))
                host().send_again_until_heard(hosted, job.ended.wait)
        seen = level


def run_remote(
    control: str, job_id: int, payload: bytes, trace: dict[str, str] | None = None
) -> bytes:
    """The Ray task: run one target on this worker's host; answer as a worker does.
    ``trace``: the caller's trace context, if it traces."""
    global _current
    jobs: list[_RemoteJob] = []

    def started(hosted: HostedJob) -> None:
        global _current
        job = _RemoteJob(control, hosted)
        jobs.append(job)
        _current = job
        _hand_to_watcher(job)

    try:
        return host().run(job_id, payload, started, trace)
    finally:
        for job in jobs:
            job.ended.set()
            job.wake.set()
        _current = None  # the driver ends the watcher's wait (no actor call from here)


def wait_gone(pid: int, timeout: float) -> bool:
    """On the node of a killed worker: wait until its process is gone (a zombie counts)."""
    deadline = time.monotonic() + timeout
    while not _process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # pragma: no cover - no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
