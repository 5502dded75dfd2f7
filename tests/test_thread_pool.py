"""The thread pool: reuse, retirement, limiters, stats, and interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import anyio
import anyio.lowlevel
import pytest

import threadbridge as tb
from threadbridge import _thread

from .helpers import QuietRun, Signal, block_in_c

pytestmark = pytest.mark.anyio


async def test_threads_are_reused() -> None:
    """Sequential calls run on threads the pool already has: none is started anew."""
    first = await tb.run_killable(threading.current_thread)
    assert first.name == "threadbridge-worker"
    assert first.daemon
    pool = {t for t in threading.enumerate() if t.name == "threadbridge-worker"}
    for _ in range(20):
        assert await tb.run_killable(threading.current_thread) in pool


async def test_idle_threads_retire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool thread with nothing to do for IDLE_TIMEOUT seconds exits."""
    monkeypatch.setattr(_thread, "IDLE_TIMEOUT", 0.05)
    thread = await tb.run_killable(threading.current_thread)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert tb.stats().idle_threads == tb.stats().threads


async def test_abandoned_thread_is_never_reused() -> None:
    """After an abandon, later calls run on other threads; the old one exits when done."""
    started = Signal()
    release = threading.Event()
    ran_on: list[threading.Thread] = []

    def blocked() -> None:
        ran_on.append(threading.current_thread())
        block_in_c(started, release)

    handle = tb.spawn(blocked, policy=tb.Policy(grace=0, interrupt_grace=0))
    with anyio.CancelScope() as scope:
        await started.wait()
        scope.cancel()
        await handle
    assert handle.stage is tb.Stage.ABANDONED
    later = {await tb.run_killable(threading.current_thread) for _ in range(20)}
    assert ran_on[0] not in later
    release.set()
    ran_on[0].join(timeout=10)
    assert not ran_on[0].is_alive()


async def test_limiter_bounds_concurrency() -> None:
    """With a limiter of 2, at most 2 targets run at once; the rest wait their turn."""
    limiter = anyio.CapacityLimiter(2)
    lock = threading.Lock()
    go, two_running = threading.Event(), threading.Event()
    running = 0
    peak = 0

    def target() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 2:
                two_running.set()
        go.wait()
        with lock:
            running -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(lambda: tb.run_killable(target, limiter=limiter))
        await anyio.to_thread.run_sync(two_running.wait)
        await anyio.wait_all_tasks_blocked()
        # Every other caller waits for the limiter: no third target was even submitted.
        assert tb.stats().busy_threads == 2
        assert limiter.borrowed_tokens == 2
        go.set()
    assert peak == 2
    assert limiter.borrowed_tokens == 0


async def test_spawn_with_full_limiter_starts_when_room() -> None:
    """spawn() with a full limiter returns at once and starts when a token frees up."""
    limiter = anyio.CapacityLimiter(1)
    release = threading.Event()
    order: list[str] = []

    def first_target() -> None:
        release.wait()
        order.append("first")

    first = tb.spawn(first_target, limiter=limiter)
    second = tb.spawn(lambda: order.append("second"), limiter=limiter)
    assert not second.done()
    release.set()
    await first
    await second
    assert order == ["first", "second"]


async def test_spawn_queued_then_cancelled_never_runs() -> None:
    """A spawned handle cancelled while queued for its limiter never runs its target."""
    limiter = anyio.CapacityLimiter(1)
    release = threading.Event()
    ran: list[str] = []
    first = tb.spawn(release.wait, limiter=limiter)
    second = tb.spawn(lambda: ran.append("second"), limiter=limiter)
    assert await second.stop() is tb.Stage.COOPERATIVE
    with pytest.raises(tb.TargetCancelled, match="<lambda> was stopped before it started") as info:
        await second
    assert "rung 3" not in str(info.value)
    release.set()
    await first
    assert ran == []
    assert limiter.borrowed_tokens == 0


async def test_default_limiter_is_40() -> None:
    """Without a limiter, at most 40 threads run targets at once."""
    release = threading.Event()
    handles = [tb.spawn(release.wait) for _ in range(45)]
    assert tb.default_limiter().borrowed_tokens == 40
    assert sum(not h.done() for h in handles) == 45
    release.set()
    for h in handles:
        await h


async def test_stats_counts_busy_and_stages() -> None:
    """stats() shows busy threads while targets run, and counts finished runs."""
    before = tb.stats().stages[tb.Stage.FINISHED]
    started = Signal()
    release = threading.Event()

    def target() -> None:
        started.set()
        release.wait()

    handle = tb.spawn(target)
    await started.wait()
    assert tb.stats().busy_threads >= 1
    release.set()
    await handle
    after = tb.stats()
    assert after.stages[tb.Stage.FINISHED] == before + 1
    assert after.busy_threads == 0
    assert after.threads == after.idle_threads


@pytest.mark.parametrize("runner", ["asyncio", "anyio-asyncio", "trio"])
def test_abandoned_thread_does_not_delay_exit(runner: str) -> None:
    """A 3 s blocking call abandoned at rung 3 does not delay interpreter exit."""
    code = textwrap.dedent(
        f"""
        import threading, time, threadbridge as tb
        policy = tb.Policy(grace=0, interrupt_grace=0)
        started = threading.Event()
        def blocked():
            started.set()
            time.sleep(3)
        async def main():
            import anyio
            handle = tb.spawn(blocked, policy=policy)
            await anyio.to_thread.run_sync(started.wait)  # running, not merely queued
            with anyio.CancelScope() as scope:
                scope.cancel()
                await handle
        runner = {runner!r}
        t0 = time.monotonic()
        if runner == "asyncio":
            import asyncio; asyncio.run(main())
        elif runner == "anyio-asyncio":
            import anyio; anyio.run(main)
        else:
            import trio; trio.run(main)
        print(time.monotonic())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    exited = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes on one machine
    assert "abandoning" in out.stderr
    # The run ended ~0.05 s into the 3 s sleep; waiting for it would take ~2.9 s more.
    assert exited - float(out.stdout) < 2.0


async def test_targets_run_in_a_clean_async_context() -> None:
    """sniffio sees no async library in a target, so anyio.run() works there; the
    caller's own context variables still reach it."""
    import contextvars

    import sniffio

    user_var: contextvars.ContextVar[str] = contextvars.ContextVar("user_var", default="unset")
    user_var.set("from the caller")

    def target() -> tuple[str, str, int]:
        try:
            library = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            library = "none"

        async def inner() -> int:
            await anyio.lowlevel.checkpoint()
            return 42

        return library, user_var.get(), anyio.run(inner)

    assert await tb.run_killable(target) == ("none", "from the caller", 42)


class Refusing:
    """A capacity limiter whose release raises, as a buggy or strict one might."""

    def __init__(self) -> None:
        self.inner = anyio.CapacityLimiter(1)

    def acquire_on_behalf_of_nowait(self, borrower: object) -> None:
        self.inner.acquire_on_behalf_of_nowait(borrower)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.inner.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        self.inner.release_on_behalf_of(borrower)
        raise ValueError("refused")


async def test_limiter_release_error_reaches_the_await() -> None:
    """An exception raised by the limiter's release is raised by the await (which does not
    hang), and the loop goes on."""
    with anyio.fail_after(10):
        with pytest.raises(ValueError, match="refused"):
            await tb.run_killable(abs, -1, limiter=Refusing())
        assert await tb.run_killable(abs, -2) == 2


async def test_any_object_with_the_limiter_interface() -> None:
    """A limiter is anything with the capacity-limiter methods; anything else is refused."""

    class Counting(Refusing):
        def release_on_behalf_of(self, borrower: object) -> None:
            self.inner.release_on_behalf_of(borrower)

    limiter = Counting()
    assert await tb.run_killable(abs, -3, limiter=limiter) == 3
    assert limiter.inner.borrowed_tokens == 0
    with pytest.raises(TypeError, match="CapacityLimiter"):
        tb.spawn(abs, 1, limiter=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_capacity_limiter_under_trio() -> None:
    """A trio.CapacityLimiter bounds targets under trio, queued callers included."""
    import trio

    limiter = trio.CapacityLimiter(1)
    release = threading.Event()
    first = tb.spawn(release.wait, limiter=limiter)
    second = tb.spawn(abs, -5, limiter=limiter)  # waits for the token
    assert limiter.borrowed_tokens == 1
    assert not second.done()
    release.set()
    assert await first is True
    assert await second == 5
    assert await tb.run_killable(abs, -6, limiter=limiter) == 6
    assert limiter.borrowed_tokens == 0


def test_idle_threads_retire_after_a_busy_spell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many pool threads racing for many short calls, then silence: every one of them
    retires. (CPython's SimpleQueue.get() can wait for ever once its timeout has run out
    while another thread took the item it was woken for; the pool must not rely on it.)"""
    from threadbridge import _stats

    monkeypatch.setattr(_thread, "IDLE_TIMEOUT", 0.001)
    backend = _thread.ThreadBackend()  # its own pool and threads
    before = set(threading.enumerate())
    done = threading.Semaphore(0)
    ends: list[object] = []
    try:
        started = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            backend.start(QuietRun(ends, done), (time.sleep, (0.0002,)))  # type: ignore[arg-type]
            started += 1
            if started % 50 == 0:
                time.sleep(0.0005)  # threads whose timeout runs out now and then
        for _ in range(started):
            assert done.acquire(timeout=30)
        workers = [
            t for t in set(threading.enumerate()) - before if t.name == "threadbridge-worker"
        ]
        give_up = time.monotonic() + 10
        for thread in workers:
            thread.join(timeout=max(0.0, give_up - time.monotonic()))
        assert [t for t in workers if t.is_alive()] == []
        assert backend.pool.counts()["idle_threads"] == 0
    finally:
        _stats.unregister(backend.pool)


def test_idle_threads_retire_together_after_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Threads that fall idle together retire together, one IDLE_TIMEOUT later: a thread
    that retires must not restart another's wait (32 threads went 32 -> 15 -> 7 -> 3 ->
    1 -> 0, one IDLE_TIMEOUT per step, instead of all at once)."""
    from threadbridge import _stats

    idle_timeout = 2.0
    monkeypatch.setattr(_thread, "IDLE_TIMEOUT", idle_timeout)
    backend = _thread.ThreadBackend()  # its own pool and threads
    count = 32
    ends: list[object] = []
    done = threading.Semaphore(0)
    arrived = threading.Semaphore(0)
    release = threading.Event()
    threads: list[threading.Thread] = []

    def hold() -> None:
        threads.append(threading.current_thread())
        arrived.release()
        release.wait(60)

    try:
        for _ in range(count):
            backend.start(QuietRun(ends, done), (hold, ()))  # type: ignore[arg-type]
        for _ in range(count):
            assert arrived.acquire(timeout=30)
        release.set()
        for _ in range(count):
            assert done.acquire(timeout=30)
        idle_from = time.monotonic()
        assert len(set(threads)) == count
        give_up = idle_from + 30
        for thread in threads:
            thread.join(timeout=max(0.0, give_up - time.monotonic()))
        took = time.monotonic() - idle_from
        assert [t for t in threads if t.is_alive()] == []
        # One IDLE_TIMEOUT, and a generous allowance for a loaded machine; the defect
        # took five.
        assert took < 2 * idle_timeout + 1, took
        assert backend.pool.counts()["idle_threads"] == 0
    finally:
        release.set()
        _stats.unregister(backend.pool)


async def test_a_limiter_needs_only_trios_two_methods() -> None:
    """trio's documented limiter interface is acquire_on_behalf_of and
    release_on_behalf_of: an object with just those two bounds the calls, spawned or
    awaited, and gets every token back."""

    class Minimal:
        def __init__(self) -> None:
            self.inner = anyio.CapacityLimiter(1)

        async def acquire_on_behalf_of(self, borrower: object) -> None:
            await self.inner.acquire_on_behalf_of(borrower)

        def release_on_behalf_of(self, borrower: object) -> None:
            self.inner.release_on_behalf_of(borrower)

    limiter = Minimal()
    release = threading.Event()
    running = Signal()

    def hold() -> bool:
        running.set()
        return release.wait(30)

    first = tb.spawn(hold, limiter=limiter)  # type: ignore[arg-type]
    with anyio.fail_after(30):
        await running.wait()  # it holds the only token
    second = tb.spawn(abs, -5, limiter=limiter)  # type: ignore[arg-type]
    await anyio.lowlevel.checkpoint()
    assert not second.done()  # the limiter holds it back
    release.set()
    assert await first is True
    assert await second == 5
    assert await tb.run_killable(abs, -6, limiter=limiter) == 6  # type: ignore[arg-type]
    assert limiter.inner.borrowed_tokens == 0


async def test_a_release_error_after_the_target_raised_chains_the_targets_error() -> None:
    """When the target raised and the limiter's release raises too, the release's error
    reaches the await with the target's as its __context__, as in trio."""

    def fails() -> None:
        raise KeyError("the target's")

    with pytest.raises(ValueError, match="refused") as info:
        await tb.run_killable(fails, limiter=Refusing())
    assert isinstance(info.value.__context__, KeyError)
