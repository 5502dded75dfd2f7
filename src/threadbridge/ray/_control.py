"""The control actor: how rungs 1 and 2 reach a running Ray task, and where it runs.

One actor per driver, made on first use. The driver sets the rung each job has reached;
the watcher thread of the Ray worker that runs the job waits on it, and says where the
task runs (for rung 3, which waits until that process is gone).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from .. import _locks
from ._lib import ray

STOP, INTERRUPT, GONE = 1, 2, -1


class Control:
    """The rung each job has reached, awaited by the jobs' watchers, and where each
    job's task runs."""

    def __init__(self) -> None:
        self.levels: dict[int, int] = {}
        self.changed: dict[int, asyncio.Event] = {}
        self.places: dict[int, tuple[int, str]] = {}
        self.placed: dict[int, asyncio.Event] = {}
        # where() of a running job: asked of its watcher, which tells its stack.
        self.asked: dict[int, asyncio.Event] = {}  # set once the watcher has told
        self.stacks: dict[int, str | None] = {}
        # Where each job's target was as rung 2 fired, told by its watcher at once (a
        # task killed at rung 3 sends no answer that could carry it).
        self.said: dict[int, tuple[str, str]] = {}

    def _event(self, job: int) -> asyncio.Event:
        event = self.changed.get(job)
        if event is None:
            event = self.changed[job] = asyncio.Event()
        return event

    async def wait(self, job: int, seen: int, timeout: float) -> tuple[int, bool]:
        """The job's level once it differs from ``seen`` (or after ``timeout``), and
        whether the driver asks where its target is (answered by ``tell_where()``)."""
        event = self._event(job)
        if self.levels.get(job, 0) == seen and job not in self.asked:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.levels.get(job, 0), job in self.asked

    def _wake(self, job: int) -> None:
        self._event(job).set()
        self.changed[job] = asyncio.Event()  # later waiters wait for the next change

    async def ask_where(self, job: int, timeout: float) -> str | None:
        """The stack of the job's target, as its watcher tells it (None: not told within
        ``timeout``, or it runs no frame of its own)."""
        told = self.asked.get(job)
        if told is None:
            told = self.asked[job] = asyncio.Event()
            self._wake(job)
        try:
            await asyncio.wait_for(told.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            if self.asked.get(job) is told and told.is_set():
                del self.asked[job]
        return self.stacks.pop(job, None)

    def tell_where(self, job: int, stack: str | None) -> None:
        """From the job's watcher: where its target is now."""
        told = self.asked.get(job)
        if told is not None:
            self.stacks[job] = stack
            told.set()

    def said_where(self, job: int, where: tuple[str, str]) -> None:
        """From the job's watcher: where its target was as rung 2 fired (line, stack)."""
        self.said[job] = where

    def where_said(self, job: int) -> tuple[str, str] | None:
        """Where the job's target was as rung 2 fired, if its watcher has said it."""
        return self.said.get(job)

    async def set(self, job: int, level: int) -> bool:
        """Raise the job's level (GONE: it has ended). Returns whether its task is known
        to have started and not ended: whether the level can reach a running target."""
        if job in self.levels and self.levels[job] == GONE:
            return False
        self.levels[job] = max(level, self.levels.get(job, 0)) if level > 0 else level
        self._wake(job)
        if level == GONE:
            self._forget_later(job)
            return False
        return job in self.places

    def started(self, job: int, place: tuple[int, str]) -> None:
        """The job's task has started in this worker process (pid, node id)."""
        self.places[job] = place
        event = self.placed.pop(job, None)
        if event is not None:
            event.set()
        if self.levels.get(job) == GONE:
            self._forget_later(job)  # word of the start came after word of the end

    async def where(self, job: int, timeout: float) -> tuple[int, str] | None:
        """The worker process (pid, node id) that runs or ran the job. Word of it is sent
        as the task starts: it is waited for up to ``timeout``, as it may still be on
        its way when the driver asks (a task killed as soon as it started)."""
        if job not in self.places:
            event = self.placed.setdefault(job, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                self.placed.pop(job, None)
        return self.places.get(job)

    def _forget_later(self, job: int) -> None:
        # Soon, not now: a late rung for an ended job finds it gone, not new.
        asyncio.get_running_loop().call_later(60, self._forget, job)

    def _forget(self, job: int) -> None:
        self.levels.pop(job, None)
        self.changed.pop(job, None)
        self.places.pop(job, None)
        self.placed.pop(job, None)
        self.said.pop(job, None)


_lock = _locks.Lock()
_handle: Any = None
_name = ""


def control() -> tuple[Any, str]:
    """In the driver: its control actor, and its name (tasks find it by name: a name is
    cheaper to send with every task than a handle)."""
    global _handle, _name
    with _lock:
        if _handle is None:
            name = f"threadbridge-control-{uuid.uuid4().hex}"
            actor = ray.remote(num_cpus=0, max_concurrency=10_000)(Control)
            _handle = actor.options(name=name).remote()
            _name = name
        return _handle, _name


_found: dict[str, Any] = {}  # in a Ray worker: control actors by name


def find_control(name: str) -> Any:
    """In a Ray worker: the control actor of that name."""
    handle = _found.get(name)
    if handle is None:
        handle = _found[name] = ray.get_actor(name)
    return handle
