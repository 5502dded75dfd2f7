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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

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


class Source(Protocol):
    """A pool that stats() reads."""

    def counts(self) -> dict[str, int]:
        """Its share of the ``COUNT_FIELDS``, taken under its own lock."""
        ...

    def describe_running(self) -> list[str]:
        """One line per target it runs now (busy or abandoned), for leak reports."""
        ...


_sources: weakref.WeakSet[Source] = weakref.WeakSet()
_lock = threading.Lock()
_cond = threading.Condition(_lock)
_waiters = 0  # threads in wait_quiet() plus registered quiet callbacks
_quiet_callbacks: list[Callable[[], object]] = []
_stages: dict[Stage, int] = {stage: 0 for stage in Stage if stage is not Stage.RUNNING}


def _reset_after_fork() -> None:
    global _lock, _cond, _waiters
    _lock = threading.Lock()
    _cond = threading.Condition(_lock)
    _waiters = 0
    _quiet_callbacks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def register(source: Source) -> None:
    with _lock:
        _sources.add(source)


def unregister(source: Source) -> None:
    with _lock:
        _sources.discard(source)


def count_stage(stage: Stage) -> None:
    with _lock:
        _stages[stage] += 1


def _counts() -> dict[str, int]:
    totals = dict.fromkeys(COUNT_FIELDS, 0)
    for source in list(_sources):
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
    if not _waiters:  # read without the lock: a new waiter checks the counts itself
        return
    with _lock:
        _cond.notify_all()
        if _quiet_callbacks and not _active(_counts()):
            callbacks = _quiet_callbacks[:]
            _quiet_callbacks.clear()
            _set_waiters(-len(callbacks))
            for callback in callbacks:
                callback()


def _set_waiters(delta: int) -> None:
    global _waiters
    _waiters += delta


def when_quiet(callback: Callable[[], object]) -> bool:
    """Call ``callback`` (promptly, from any thread) once no target runs anywhere.

    Returns False without registering it if none runs now.
    """
    with _lock:
        _set_waiters(1)
        if not _active(_counts()):
            _set_waiters(-1)
            return False
        _quiet_callbacks.append(callback)
        return True


def wait_quiet(timeout: float | None) -> bool:
    """Block until no target runs anywhere; False if the timeout passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _lock:
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


def describe_running() -> list[str]:
    return [line for source in list(_sources) for line in source.describe_running()]


def kept_processes() -> set[int]:
    """Processes that pools keep on purpose while their event loop lives (idle workers,
    fork servers): reuse, not leaks, as idle pool threads are."""
    found: set[int] = set()
    for source in list(_sources):
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
    counts = _counts()
    with _lock:
        stages = MappingProxyType(dict(_stages))
    return Stats(threads=counts["idle_threads"] + counts["busy_threads"], stages=stages, **counts)


export(Stats, stats)
