"""Every ordinary way of cancelling an await climbs the ladder before it propagates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import threadbridge as tb

from .helpers import ALL_LOOPS, Signal

pytestmark = pytest.mark.anyio


@pytest.fixture(params=ALL_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """asyncio, trio, and asyncio on uvloop."""
    return request.param


class Recorder:
    """A cooperative target that records when it saw its token."""

    def __init__(self) -> None:
        self.started = Signal()
        self.events: list[str] = []

    def __call__(self) -> None:
        self.started.set()
        try:
            tb.current_token().wait()
            self.events.append("token")
            tb.check_cancelled()
        finally:
            self.events.append("stopped")


async def run_until_deadline(rec: Recorder, scope: Any) -> None:
    """Run ``rec`` in ``scope``, whose deadline is brought to 50 ms from when the target
    has started: the deadline finds it running (a target stopped before it starts never
    runs, which these tests are not about)."""

    async def tighten() -> None:
        await rec.started.wait()
        scope.deadline = anyio.current_time() + 0.05

    async with anyio.create_task_group() as tg:
        tg.start_soon(tighten)
        await tb.run_killable(rec)


async def test_move_on_after() -> None:
    """anyio.move_on_after: the target has stopped when the scope exits."""
    rec = Recorder()
    with anyio.move_on_after(30) as scope:
        await run_until_deadline(rec, scope)
    assert scope.cancelled_caught
    assert rec.events == ["token", "stopped"]


async def test_fail_after() -> None:
    """anyio.fail_after raises TimeoutError only after the target has stopped."""
    rec = Recorder()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(30) as scope:
            await run_until_deadline(rec, scope)
    assert rec.events == ["token", "stopped"]


async def test_task_group_sibling_failure() -> None:
    """A sibling's failure tears the group down; the target stops before the group exits."""
    rec = Recorder()

    async def failing_sibling() -> None:
        await rec.started.wait()
        raise ValueError("sibling failed")

    with (
        pytest.RaisesGroup(ValueError)
        if hasattr(pytest, "RaisesGroup")
        else pytest.raises(BaseException)
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tb.run_killable, rec)
            tg.start_soon(failing_sibling)
    assert rec.events == ["token", "stopped"]


async def test_cancel_scope_cancel_from_another_task() -> None:
    """scope.cancel() from a different task stops the target."""
    rec = Recorder()
    async with anyio.create_task_group() as tg:

        async def canceller() -> None:
            await rec.started.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(canceller)
        await tb.run_killable(rec)
    assert rec.events == ["token", "stopped"]


async def test_already_cancelled_scope_does_not_start_the_target() -> None:
    """Inside a scope that is already cancelled, nothing starts."""
    ran = threading.Event()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await tb.run_killable(ran.set)
    assert scope.cancelled_caught
    assert not ran.is_set()


async def test_nested_shield_keeps_the_work_running() -> None:
    """A shielded scope inside a cancelled one lets the call finish normally."""
    gate = threading.Event()
    with anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope(shield=True):
            gate.set()
            assert await tb.run_killable(lambda: 5) == 5


async def test_cancel_while_waiting_for_limiter() -> None:
    """A call cancelled while queued behind its limiter never starts."""
    limiter = anyio.CapacityLimiter(1)
    release = threading.Event()
    started = Signal()
    ran: list[str] = []

    def holder() -> None:
        started.set()
        release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: tb.run_killable(holder, limiter=limiter))
        await started.wait()
        with anyio.move_on_after(0.05) as scope:
            await tb.run_killable(lambda: ran.append("ran"), limiter=limiter)
        assert scope.cancelled_caught
        release.set()
    assert ran == []
    assert limiter.borrowed_tokens == 0


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_move_on_after() -> None:
    """trio.move_on_after works like anyio's."""
    import trio

    rec = Recorder()
    with trio.move_on_after(30) as scope:
        await run_until_deadline(rec, scope)
    assert scope.cancelled_caught
    assert rec.events == ["token", "stopped"]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_starts_and_waits_protected_from_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under trio, a target is started and waited for with KeyboardInterrupt protection:
    a Ctrl-C there reaches the wait, whose ladder stops the target first. (trio marks a
    protected function's code and returns the function itself: code that took "the
    same function back" for "nothing to protect" ran the start and the wait unprotected,
    and a Ctrl-C escaped with the target still running, now and then, on Python 3.14.)"""
    import trio

    from threadbridge import _thread

    seen: list[bool] = []
    start = _thread.ThreadBackend.start

    def recording_start(self: Any, run: Any, job: object) -> Any:
        seen.append(trio.lowlevel.currently_ki_protected())
        return start(self, run, job)

    monkeypatch.setattr(_thread.ThreadBackend, "start", recording_start)
    assert await tb.run_killable(int, "7") == 7
    assert seen == [True]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_nursery_cancel() -> None:
    """A trio nursery cancelled by a sibling stops the target first."""
    import trio

    rec = Recorder()
    async with trio.open_nursery() as nursery:

        async def canceller() -> None:
            await rec.started.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(canceller)
        await tb.run_killable(rec)
    assert rec.events == ["token", "stopped"]


async def test_rung1_happens_inside_the_cancel() -> None:
    """The token is set by scope.cancel() itself: a target that the canceller unblocks
    right after cancelling sees the stop requested, every time."""
    for _ in range(20):
        assert await _cancel_then_unblock() == [True]


async def _cancel_then_unblock() -> list[bool]:
    started = Signal()
    unblocked, checked = threading.Event(), threading.Event()
    seen: list[bool] = []

    def target() -> None:
        started.set()
        unblocked.wait()
        seen.append(tb.cancel_requested())
        checked.set()

    with anyio.CancelScope() as scope:
        handle = tb.spawn(target, policy=tb.Policy(grace=30))

        async def cancel_then_unblock() -> None:
            await started.wait()
            await anyio.wait_all_tasks_blocked()  # the awaiter below is waiting
            scope.cancel()
            unblocked.set()
            # Hold the loop until the target has looked: the cancelled await gets no
            # chance to run first, so only the cancel itself can have set the token.
            assert checked.wait(10)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_then_unblock)
            await handle
    assert handle.stage is tb.Stage.COOPERATIVE
    return seen


def test_trio_guest_run_on_an_asyncio_loop() -> None:
    """trio.lowlevel.start_guest_run runs trio's tasks inside an asyncio loop's callbacks,
    in its thread. A trio task there gets trio's handling and an asyncio task beside it
    gets asyncio's (the trio task's await failed: "trio.run received unrecognized yield
    message"); cancelling each climbs its ladder."""
    import asyncio

    import trio

    policy = tb.Policy(grace=0.05, interrupt_grace=5)

    def spin(seconds: float, started: Callable[[], object] | None = None) -> str:
        if started is not None:
            started()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "done"

    async def trio_side() -> list[str]:
        seen = [await tb.run_killable(spin, 0.01)]
        started = trio.Event()
        token = trio.lowlevel.current_trio_token()
        handle = tb.spawn(spin, 60, lambda: token.run_sync_soon(started.set), policy=policy)
        await started.wait()
        seen.append((await handle.stop()).value)
        seen.append(str(await tb.run_killable(int.__add__, 2, 3, backend="process")))
        return seen

    async def host() -> tuple[list[str], list[str]]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        trio.lowlevel.start_guest_run(
            trio_side,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done.set_result,
        )
        asyncio_side = [await tb.run_killable(spin, 0.01)]
        running = asyncio.Event()
        handle = tb.spawn(spin, 60, lambda: loop.call_soon_threadsafe(running.set), policy=policy)
        await running.wait()
        asyncio_side.append((await handle.stop()).value)
        return (await done).unwrap(), asyncio_side

    trio_seen, asyncio_seen = asyncio.run(asyncio.wait_for(host(), 60))
    assert trio_seen == ["done", "interrupted", "5"]
    assert asyncio_seen == ["done", "interrupted"]
