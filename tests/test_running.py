"""threadbridge.running(): every target running now, with where() on demand, on threads
and worker processes, on both loops (Ray: in test_ray.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import pytest

import threadbridge as tb
from threadbridge import _stats

from . import targets
from .helpers import Blocked
from .test_process import lines_of

pytestmark = pytest.mark.anyio

FAST = tb.Policy(grace=0.05, interrupt_grace=0.5)


def _where_in_thread(target: tb.RunningTarget) -> str:
    return target.where()


async def test_nothing_runs_between_calls() -> None:
    assert await tb.run_killable(targets.add, 1, 1) == 2
    assert await tb.run_killable(targets.add, 1, 1, backend="process") == 2
    assert tb.running() == []


async def test_a_thread_target_is_listed_with_its_stack(tmp_path: Path) -> None:
    path = tmp_path / "log"
    before = time.monotonic()
    handle = tb.spawn(targets.spin_marked, str(path), policy=FAST)
    await lines_of(path, 1)
    (target,) = tb.running()
    assert (target.name, target.backend, target.rung) == ("spin_marked", "thread", 0)
    assert target.pid == os.getpid()
    assert target.thread_id in {t.ident for t in threading.enumerate()}
    assert target.thread_id != threading.get_ident()
    assert before <= target.started <= time.monotonic()
    assert "spin_marked on thread" in repr(target)
    frames = target.where().splitlines()  # read at once, from any thread: the loop's too
    assert frames[0].endswith(", in spin_marked")
    # Its own frames only (it may still be in mark(), closing the file it wrote to).
    files = [line for line in frames if line.startswith("  File ")]
    assert files
    assert all(f'"{targets.__file__}"' in line for line in files)
    assert await handle.stop() is tb.Stage.INTERRUPTED
    assert target.where() == "(not running: it has ended, or has not started yet)"
    assert tb.running() == []


async def test_an_abandoned_thread_is_listed_until_it_ends() -> None:
    blocked = Blocked()
    handle = await blocked.abandoned()
    try:
        (target,) = tb.running()
        assert (target.name, target.rung) == (handle.name, 3)
        assert "self.release.wait()" in target.where()
    finally:
        blocked.release.set()
    assert await anyio.to_thread.run_sync(_stats.wait_quiet, 30)  # it ends once released
    assert tb.running() == []


async def test_a_process_target_says_where_it_is(tmp_path: Path) -> None:
    path = tmp_path / "log"
    handle = tb.spawn(targets.spin_marked, str(path), backend="process", policy=FAST)
    await lines_of(path, 1)
    (target,) = tb.running()
    assert (target.name, target.backend, target.rung, target.thread_id) == (
        "spin_marked",
        "process",
        0,
        None,
    )
    assert target.pid is not None
    assert target.pid != os.getpid()
    # The worker is asked; its answer is read by this loop: where() waits in a thread.
    frames = (await anyio.to_thread.run_sync(_where_in_thread, target)).splitlines()
    assert frames[0].endswith(", in spin_marked")
    # Called in the loop itself, it cannot wait for that answer, and says so at once.
    assert "call it from another thread" in target.where()
    assert await handle.stop() is tb.Stage.INTERRUPTED
    assert (await anyio.to_thread.run_sync(_where_in_thread, target)).startswith("(not running")
    assert tb.running() == []


async def test_a_worker_in_one_long_c_call_cannot_say(tmp_path: Path) -> None:
    """A target that holds the GIL keeps the worker's control thread from answering:
    where() says so after its timeout rather than hanging."""
    path = tmp_path / "log"

    handle = tb.spawn(
        targets.busy_then_c_call,
        str(path),
        backend="process",
        policy=tb.Policy(grace=0, interrupt_grace=0),
    )
    await lines_of(path, 1)
    (target,) = tb.running()
    # The C call starts right after the mark; a where() answered in that moment (the
    # worker descheduled there) shows the stack, and the next one finds the C call.
    for _ in range(3):
        said = await anyio.to_thread.run_sync(_where_in_thread, target)
        if not said.startswith("  File"):
            break
    assert said.startswith("(the worker did not say within")
    assert await handle.stop() is tb.Stage.KILLED


async def test_targets_are_listed_longest_running_first(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    handles = [tb.spawn(targets.spin_marked, str(first), policy=FAST)]
    await lines_of(first, 1)
    handles.append(tb.spawn(targets.spin_marked, str(second), backend="process", policy=FAST))
    await lines_of(second, 1)
    listed = tb.running()
    assert [t.backend for t in listed] == ["thread", "process"]
    assert listed[0].started <= listed[1].started
    for handle in handles:
        await handle.stop()


class _Source:
    """A pool as stats() and running() read it, with nothing running."""

    def counts(self) -> dict[str, int]:
        return {}

    def running(self) -> list[tb.RunningTarget]:
        return []


def test_listings_while_pools_come_and_go() -> None:
    """Pools register and go (unregistered, or dropped) in other threads while running()
    and stats() read them: every read succeeds (they read the pools as a WeakSet, which
    another thread changed under them: "Set changed size during iteration")."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                kept = [_Source() for _ in range(20)]
                for source in kept:
                    _stats.register(source)
                for source in kept[::2]:
                    _stats.unregister(source)
                del kept, source  # the others go with their last reference
        except BaseException as exc:  # pragma: no cover - what the test reports
            errors.append(exc)

    churners = [threading.Thread(target=churn) for _ in range(2)]
    for thread in churners:
        thread.start()
    try:
        for _ in range(3000):
            assert tb.running() == []
            assert tb.stats().busy_threads == 0
    finally:
        stop.set()
        for thread in churners:
            thread.join(30)
    assert errors == []
    # Every one is gone (unregistered, or dropped), and forgotten once read.
    assert not [s for s in _stats._live_sources() if isinstance(s, _Source)]
    assert all(ref() is not None for ref in _stats._sources.values())
