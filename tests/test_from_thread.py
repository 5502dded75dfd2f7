"""threadbridge.from_thread: thread targets calling back into their event loop."""

from __future__ import annotations

import threading

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest

import threadbridge as tb

from .helpers import Signal

pytestmark = pytest.mark.anyio


async def test_run_and_run_sync_return_and_raise() -> None:
    """run() awaits an async function in the loop, run_sync() calls a plain one in the
    loop's thread; results and exceptions come back as themselves."""
    loop_thread = threading.get_ident()

    async def double(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return 2 * x

    async def fail() -> None:
        raise KeyError("async")

    def where() -> int:
        return threading.get_ident()

    def target() -> tuple[int, bool, str]:
        doubled = tb.from_thread.run(double, 21)
        in_loop = tb.from_thread.run_sync(where) == loop_thread
        try:
            tb.from_thread.run(fail)
        except KeyError as exc:
            error = str(exc)
        return doubled, in_loop, error

    assert await tb.run_killable(target) == (42, True, "'async'")


async def test_cancel_while_waiting_in_from_thread_run() -> None:
    """A target waiting on a call into the loop stops at rung 1 with TargetCancelled, and
    the call in the loop is cancelled too."""
    started = Signal()
    events: list[str] = []
    cancelled_in_loop = anyio.Event()

    async def never_done() -> None:
        try:
            started.set()
            await anyio.sleep_forever()
        finally:
            cancelled_in_loop.set()

    def target() -> None:
        try:
            tb.from_thread.run(never_done)
        except tb.TargetCancelled:
            events.append("TargetCancelled")
            raise

    handle = tb.spawn(target, policy=tb.Policy(grace=30))
    await started.wait()
    assert await handle.stop() is tb.Stage.COOPERATIVE
    assert events == ["TargetCancelled"]
    with anyio.fail_after(10):
        await cancelled_in_loop.wait()


async def test_from_thread_after_stop_requested_raises_at_once() -> None:
    """Once the token is set, from_thread calls raise instead of reaching the loop."""
    started, release = Signal(), threading.Event()
    calls: list[str] = []

    def target() -> str:
        started.set()
        release.wait()
        try:
            tb.from_thread.run_sync(calls.append, "reached the loop")
        except tb.TargetCancelled:
            return "raised"
        return "called"

    handle = tb.spawn(target, policy=tb.Policy(grace=30))
    await started.wait()
    handle.cancel()
    release.set()
    assert await handle == "raised"
    assert calls == []


async def test_from_thread_outside_a_thread_target() -> None:
    """Called from the loop or from a thread threadbridge did not start: a clear error."""
    with pytest.raises(RuntimeError, match="must be called from a thread target"):
        tb.from_thread.run_sync(print)
    with pytest.raises(RuntimeError, match="must be called from a thread target"):
        await anyio.to_thread.run_sync(tb.from_thread.run_sync, print)


async def test_run_sync_refuses_async_functions() -> None:
    """run_sync() given an async function raises TypeError (no coroutine left unawaited)."""

    async def coro_fn() -> None:
        pass

    def target() -> None:
        _ = tb.from_thread.run_sync(coro_fn)

    with pytest.raises(TypeError, match=r"from_thread\.run"):
        await tb.run_killable(target)


async def test_peers_from_thread_with_their_public_tokens() -> None:
    """The documented one-liner for code written against anyio.from_thread: pass the
    loop's token, captured in the loop, to the target."""
    token = anyio.lowlevel.current_token()

    async def answer() -> int:
        return 7

    def target() -> int:
        return anyio.from_thread.run(answer, token=token)

    assert await tb.run_killable(target) == 7


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_from_thread_with_trio_token() -> None:
    """trio.from_thread.run(..., trio_token=...) works in a thread target."""
    import trio

    trio_token = trio.lowlevel.current_trio_token()

    async def answer() -> int:
        await trio.lowlevel.checkpoint()
        return 8

    def target() -> int:
        return trio.from_thread.run(answer, trio_token=trio_token)

    assert await tb.run_killable(target) == 8


class _NotAnError(BaseException):
    pass


async def test_base_exceptions_in_the_loop_are_handed_to_the_thread() -> None:
    """SystemExit, KeyboardInterrupt and other BaseExceptions raised by the call in the
    loop go to the thread that made it (as anyio's and trio's from_thread do): the loop
    goes on, whether it is asyncio or trio."""
    import sys

    async def interrupted() -> None:
        raise KeyboardInterrupt

    def raise_base() -> None:
        raise _NotAnError("base")

    def target() -> list[str]:
        caught = []
        try:
            tb.from_thread.run_sync(sys.exit, 3)
        except SystemExit as exc:
            caught.append(f"SystemExit {exc.code}")
        try:
            tb.from_thread.run(interrupted)
        except KeyboardInterrupt:
            caught.append("KeyboardInterrupt")
        try:
            tb.from_thread.run_sync(raise_base)
        except _NotAnError as exc:
            caught.append(str(exc))
        return caught

    assert await tb.run_killable(target) == ["SystemExit 3", "KeyboardInterrupt", "base"]
    await anyio.lowlevel.checkpoint()  # the loop goes on
