"""threadbridge.stats(): derived from the pools themselves, plus totals per stage.

Each pool (the thread pool, each process pool) is a ``Source``: it reports its own
counts under its own lock, so there is no second set of books to keep in step. Only the
number of runs that ended at each stage is a global counter. A source calls
``changed()`` after a count went down, outside its lock, to wake whoever waits for
every target to end (``threadbridge.testing``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from . import _locks
from ._policy import Stage
from ._public import export


@dataclass(frozen=True)
class Stats:
    """A snapshot of threadbridge's threads, workers and finished runs.

    Attributes:
        threads: live pool threads (idle plus busy), abandoned ones not included.
        idle_threads: pool threads waiting for work.
        busy_threads: pool threads running a target.
        abandoned_threads: threads abandoned at rung 3 that are still running.
        idle_workers: worker processes waiting for work (standby included).
        busy_workers: worker processes running a target.
        standby_workers: idle workers kept warm so that a call after a kill starts at once.
        unreaped_workers: worker processes SIGKILLed at rung 3 that have not been reaped
            within a bound (stuck in the kernel); logged as errors.
        remote_tasks: tasks submitted to a cluster (``backend="ray"``) that have not ended.
        stages: how many runs ended at each stage since the process started.

    Example:

        s = threadbridge.stats()
        print(f"{s.busy_threads} busy, {s.abandoned_threads} abandoned, "
              f"{s.stages[threadbridge.Stage.INTERRUPTED]} interrupted so far")
    """

    threads: int = 0
    idle_threads: int = 0
    busy_threads: int = 0
    abandoned_threads: int = 0
    idle_workers: int = 0
    busy_workers: int = 0
    standby_workers: int = 0
    unreaped_workers: int = 0
    remote_tasks: int = 0
    stages: Mapping[Stage, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def active(self) -> int:
        """Targets still running anywhere: busy threads, abandoned threads, busy workers,
        remote tasks."""
        return self.busy_threads + self.abandoned_threads + self.busy_workers + self.remote_tasks


COUNT_FIELDS = (
    "idle_threads",
    "busy_threads",
    "abandoned_threads",
    "idle_workers",
    "busy_workers",
    "standby_workers",
    "unreaped_workers",
    "remote_tasks",
)


class RunningTarget:
    """One target running now, as ``threadbridge.running()`` lists it.

    Attributes:
        name: the target's name, as in log records.
        backend: ``"thread"``, ``"process"`` or ``"ray"``.
        started: when it started, by ``time.monotonic()``.
        rung: how far its ladder has climbed (0: not cancelled; 3: abandoned threads,
            which still run, are listed too).
        pid: the process it runs in (this one for threads; None for Ray tasks).
        thread_id: the thread it runs in, for a thread target (``threading.get_ident()``
            there); None elsewhere.

    ``where()`` takes its stack now (see ``Handle.stopped_at`` for the format).
    """

    __slots__ = (
        "_run",
        "_said",
        "_where",
        "backend",
        "name",
        "pid",
        "rung",
        "started",
        "thread_id",
    )

    def __init__(
        self,
        run: Any,
        backend: str,
        started: float,
        pid: int | None,
        thread_id: int | None,
        where: Callable[[], str],
        said: str,
    ) -> None:
        self._run = run  # its ladder (a _ladder.Run): the pytest plugin stops a leak by it
        self._said = said  # what runs it, for leak reports: "thread running crunch"
        self.name: str = run.name
        self.backend = backend
        self.started = started
        self.rung = int(run.rung)
        self.pid = pid
        self.thread_id = thread_id
        self._where = where

    def where(self) -> str:
        """The target's stack right now, innermost frame last; or, in parentheses, why it
        cannot be had (it has ended; a worker that did not answer within a second, as
        when its target holds the GIL in one long C call).

        Threads: read at once. A worker process is asked, and this waits for its answer
        (up to a second): call it from a thread, not from the event loop that the
        worker's call runs in (``await anyio.to_thread.run_sync(target.where)``).
        """
        return self._where()

    def __repr__(self) -> str:
        where = f" pid={self.pid}" if self.thread_id is None else f" thread={self.thread_id}"
        age = time.monotonic() - self.started
        return (
            f"<threadbridge.RunningTarget {self.name} on {self.backend}{where} "
            f"for {age:.1f}s rung={self.rung}>"
        )


class Source(Protocol):
    """A pool that stats() reads."""

    def counts(self) -> dict[str, int]:
        """Its share of the ``COUNT_FIELDS``, taken under its own lock."""
        ...

    def running(self) -> list[RunningTarget]:
        """Each target it runs now (busy or abandoned)."""
        ...


# The sources, by id, each a weak reference (without a callback: a WeakSet's runs in
# whatever thread drops the last reference, and changes the set while another thread may
# be reading it). Read and changed only under _sources_lock, never held while another
# lock is taken.
_sources: dict[int, weakref.ref[Source]] = {}
_sources_lock = _locks.Lock()
lock = _locks.Lock()
# Waited on and notified under `with lock:`, never entered itself: `with` on a
# threading.Condition can leave its lock held (see _locks).
_cond = threading.Condition(lock)
waiters = 0  # threads in wait_quiet() plus registered quiet callbacks
_quiet_callbacks: list[Callable[[], object]] = []
# Keyed by the stage's value: an Enum member hashes in Python, a str in C (every call
# counts its stage).
stages: dict[str, int] = {stage._value_: 0 for stage in Stage if stage is not Stage.RUNNING}


def _reset_after_fork() -> None:
    global lock, _cond, waiters, _sources_lock
    lock = _locks.Lock()
    _cond = threading.Condition(lock)
    waiters = 0
    _quiet_callbacks.clear()
    _sources_lock = _locks.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def register(source: Source) -> None:
    with _sources_lock:
        _sources[id(source)] = weakref.ref(source)  # a dead one's id may be reused


def unregister(source: Source) -> None:
    with _sources_lock:
        ref = _sources.get(id(source))
        if ref is not None and ref() is source:
            del _sources[id(source)]


def _live_sources() -> list[Source]:
    """The sources now, the dead ones forgotten."""
    with _sources_lock:
        found = []
        for key, ref in list(_sources.items()):
            source = ref()
            if source is None:
                del _sources[key]
            else:
                found.append(source)
        return found


def _counts(sources: list[Source] | None = None) -> dict[str, int]:
    totals = dict.fromkeys(COUNT_FIELDS, 0)
    for source in _live_sources() if sources is None else sources:
        for name, value in source.counts().items():
            totals[name] += value
    return totals


def _active(counts: dict[str, int]) -> int:
    return (
        counts["busy_threads"]
        + counts["abandoned_threads"]
        + counts["busy_workers"]
        + counts["remote_tasks"]
    )


def active_count() -> int:
    return _active(_counts())


def changed() -> None:
    """A source's count went down: wake waiters. Call it without holding a source's lock."""
    if not waiters:  # read without the lock: a new waiter checks the counts itself
        return
    with lock:
        _cond.notify_all()
        if _quiet_callbacks and not _active(_counts()):
            callbacks = _quiet_callbacks[:]
            _quiet_callbacks.clear()
            _set_waiters(-len(callbacks))
            for callback in callbacks:
                callback()


def _set_waiters(delta: int) -> None:
    global waiters
    waiters += delta


def when_quiet(callback: Callable[[], object]) -> bool:
    """Call ``callback`` (promptly, from any thread) once no target runs anywhere.

    Returns False without registering it if none runs now.
    """
    with lock:
        _set_waiters(1)
        if not _active(_counts()):
            _set_waiters(-1)
            return False
        _quiet_callbacks.append(callback)
        return True


def wait_quiet(timeout: float | None) -> bool:
    """Block until no target runs anywhere; False if the timeout passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with lock:
        _set_waiters(1)
        try:
            while _active(_counts()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                _cond.wait(remaining)
            return True
        finally:
            _set_waiters(-1)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float | None = None) -> bool:
    """Block until ``predicate()`` (asked again whenever a count goes down, and every
    ``poll`` seconds if given: for what no count says) is true; False if ``timeout``
    passed first."""
    deadline = time.monotonic() + timeout
    with lock:
        _set_waiters(1)
        try:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                _cond.wait(remaining if poll is None else min(poll, remaining))
            return True
        finally:
            _set_waiters(-1)


# Targets still running when their event loop ended (which stopped them, as it stops a
# process pool's workers): a leak of whatever left them running, e.g. a test's call that
# was never awaited. Numbered, so that a leak check takes those since its start.
_outlived: deque[tuple[int, str]] = deque(maxlen=100)
_outlived_last = 0


def note_outlived(said: str) -> None:
    """``said`` (what ran it) was still running when its event loop ended."""
    global _outlived_last
    with lock:
        _outlived_last += 1
        _outlived.append((_outlived_last, said))


def outlived_mark() -> int:
    """For ``outlived_since()``: the number of the last target that outlived its loop."""
    return _outlived_last


def outlived_since(mark: int) -> list[str]:
    with lock:
        return [said for number, said in _outlived if number > mark]


def running() -> list[RunningTarget]:
    """Every target running now, on every backend, the longest-running first.

    Example:

        # what a debug endpoint or a signal handler might log (from a thread: see
        # RunningTarget.where())
        for target in threadbridge.running():
            print(target, target.where(), sep="\\n")
    """
    found = [target for source in _live_sources() for target in source.running()]
    found.sort(key=lambda target: target.started)
    return found


def describe_running() -> list[str]:
    """One line per running target, for leak reports."""
    return [target._said for target in running()]


def kept_processes() -> set[int]:
    """Processes that pools keep on purpose while their event loop lives (idle workers,
    fork servers): reuse, not leaks, as idle pool threads are."""
    found: set[int] = set()
    for source in _live_sources():
        kept = getattr(source, "kept_processes", None)
        if kept is not None:
            found |= kept()
    return found


def stats() -> Stats:
    """A snapshot of live threads, abandoned threads, workers and runs ended by stage.

    Example:

        s = threadbridge.stats()
        assert s.abandoned_threads == 0, f"{s.abandoned_threads} threads still running"
    """
    sources = _live_sources()
    counts = _counts(sources)
    with lock:
        counted = dict(stages)
    # Calls that ended without the ladder's run are counted by their thread pool
    # (_thread.ThreadPool.ended_by_themselves).
    for source in sources:
        counted[Stage.FINISHED._value_] += getattr(source, "ended_by_themselves", 0)
    by_stage = MappingProxyType({Stage(key): n for key, n in counted.items()})
    return Stats(threads=counts["idle_threads"] + counts["busy_threads"], stages=by_stage, **counts)


export(RunningTarget, Stats, running, stats)
