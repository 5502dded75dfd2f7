"""Process-wide counters behind threadbridge.stats()."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._policy import Stage


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
    stages: Mapping[Stage, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def active(self) -> int:
        """Targets still running anywhere: busy threads, abandoned threads, busy workers."""
        return self.busy_threads + self.abandoned_threads + self.busy_workers


class _Counters:
    """Mutable counters; every change wakes wait_quiet()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.waiters = 0  # threads in wait_quiet(); nobody is notified while it is 0
        self.idle_threads = 0
        self.busy_threads = 0
        self.abandoned_threads = 0
        self.idle_workers = 0
        self.busy_workers = 0
        self.standby_workers = 0
        self.stages: dict[Stage, int] = dict.fromkeys(Stage, 0)
        del self.stages[Stage.RUNNING]
        # What runs now, for leak reports: id(work) -> work (with a describe_running()).
        self.running: dict[int, Any] = {}
        # Called (under the lock) when the last running target ends; they must not block.
        self.quiet_callbacks: list[Callable[[], None]] = []

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            self.wake()

    def ended(self, stage: Stage) -> None:
        with self.lock:
            self.stages[stage] += 1

    def wake(self) -> None:
        """Wake wait_quiet(); call with the lock held, after a count went down."""
        if self.waiters:
            self.cond.notify_all()
        if self.quiet_callbacks and not self.active():
            callbacks, self.quiet_callbacks = self.quiet_callbacks, []
            for callback in callbacks:
                callback()

    def active(self) -> int:
        return self.busy_threads + self.abandoned_threads + self.busy_workers

    def describe_running(self) -> list[str]:
        with self.lock:
            works = list(self.running.values())
        return [work.describe_running() for work in works]

    def snapshot(self) -> Stats:
        with self.lock:
            return Stats(
                threads=self.idle_threads + self.busy_threads,
                idle_threads=self.idle_threads,
                busy_threads=self.busy_threads,
                abandoned_threads=self.abandoned_threads,
                idle_workers=self.idle_workers,
                busy_workers=self.busy_workers,
                standby_workers=self.standby_workers,
                stages=MappingProxyType(dict(self.stages)),
            )

    def wait_quiet(self, timeout: float | None) -> bool:
        """Block until no target runs anywhere; False if the timeout passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self.waiters += 1
            try:
                while self.busy_threads or self.abandoned_threads or self.busy_workers:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self.cond.wait(remaining)
                return True
            finally:
                self.waiters -= 1


COUNTERS = _Counters()


def stats() -> Stats:
    """A snapshot of live threads, abandoned threads, workers and runs ended by stage.

    Example:

        s = threadbridge.stats()
        assert s.abandoned_threads == 0, f"{s.abandoned_threads} threads still running"
    """
    return COUNTERS.snapshot()
