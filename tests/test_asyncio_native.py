"""asyncio's own ways of cancelling: asyncio.timeout, wait_for, task.cancel()."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Iterator

import pytest

import threadbridge as tb

from .helpers import spin_until


class Gate:
    """A cooperative target that tells the loop when it has started."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.started = asyncio.Event()
        self.events: list[str] = []
        self.ran = threading.Event()

    def __call__(self) -> str:
        self.ran.set()
        self.loop.call_soon_threadsafe(self.started.set)
        try:
            tb.current_token().wait()
            self.events.append("token")
            tb.check_cancelled()
            return "unreachable"
        finally:
            self.events.append("stopped")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in 3.11")
@pytest.mark.asyncio
async def test_asyncio_timeout() -> None:
    """asyncio.timeout turns into TimeoutError only after the target has stopped."""
    if sys.version_info >= (3, 11):  # also for mypy, which checks as 3.10
        gate = Gate(asyncio.get_running_loop())

        async def expire_once_started(cm: asyncio.Timeout) -> None:
            # The deadline is set once the target runs: a loaded machine may take longer
            # than any fixed deadline to start its thread (a call stopped before it
            # started has nothing to show here).
            await gate.started.wait()
            cm.reschedule(asyncio.get_running_loop().time() + 0.05)

        helpers: list[asyncio.Task[None]] = []

        async def call_in_timeout() -> None:
            async with asyncio.timeout(None) as cm:
                helpers.append(asyncio.ensure_future(expire_once_started(cm)))
                await tb.run_killable(gate)

        with pytest.raises(TimeoutError):
            await call_in_timeout()
        await helpers[0]
        assert gate.events == ["token", "stopped"]
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0


@pytest.mark.asyncio
async def test_asyncio_wait_for() -> None:
    """asyncio.wait_for times out only after the target has stopped."""
    # wait_for's deadline runs from its call: on a loaded machine it may pass before the
    # thread starts the target (then there is nothing to stop). Each try gives the start
    # more time; the first that started must have been stopped before wait_for returned.
    for deadline in (0.05, 0.5, 5.0, 30.0):
        gate = Gate(asyncio.get_running_loop())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tb.run_killable(gate), deadline)
        if gate.ran.is_set():
            break
    assert gate.events == ["token", "stopped"]


@pytest.mark.asyncio
async def test_task_cancel() -> None:
    """task.cancel() climbs the ladder, then CancelledError reaches the task."""
    gate = Gate(asyncio.get_running_loop())
    task = asyncio.ensure_future(tb.run_killable(gate))
    await gate.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.events == ["token", "stopped"]


@pytest.mark.asyncio
async def test_repeated_task_cancel_during_ladder_is_absorbed() -> None:
    """More cancel() calls while the ladder climbs do not cut it short."""
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()
    events: list[str] = []

    def target() -> None:
        loop.call_soon_threadsafe(started.set)
        spin_until(release)
        events.append("ended")

    task = asyncio.ensure_future(
        tb.run_killable(target, policy=tb.Policy(grace=30, interrupt_grace=30))
    )
    await started.wait()
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
        task.cancel()
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["ended"]


@pytest.mark.asyncio
async def test_spawn_from_plain_asyncio() -> None:
    """spawn() works in a plain asyncio task with no anyio around it."""
    assert await tb.spawn(sum, [1, 2, 3]) == 6


@pytest.mark.asyncio
async def test_rung1_happens_inside_task_cancel() -> None:
    """task.cancel() sets the token before it returns, every time."""
    for _ in range(20):
        assert await _task_cancel_then_unblock() == [True]


async def _task_cancel_then_unblock() -> list[bool]:
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    unblocked, checked = threading.Event(), threading.Event()
    seen: list[bool] = []

    def target() -> None:
        loop.call_soon_threadsafe(started.set)
        unblocked.wait()
        seen.append(tb.cancel_requested())
        checked.set()

    task = asyncio.ensure_future(tb.run_killable(target, policy=tb.Policy(grace=30)))
    await started.wait()
    await asyncio.sleep(0)  # the task is waiting for its target
    task.cancel()
    unblocked.set()
    assert checked.wait(10)  # the loop is held: only task.cancel() can have set it
    with pytest.raises(asyncio.CancelledError):
        await task
    return seen


@contextlib.contextmanager
def no_wakeup_fd() -> Iterator[None]:
    """The test starts with no signal wakeup fd (a loop of an earlier test may still be
    open, with its own), and that one is put back at the end."""
    earlier = signal.set_wakeup_fd(-1)
    try:
        yield
    finally:
        signal.set_wakeup_fd(earlier)


def test_the_loops_signal_wakeup_is_taken_back_when_it_closes() -> None:
    """The main thread's loop gets a signal wakeup fd at threadbridge's first await there
    (see docs/asyncio.md, Ctrl-C), and gives it back when asyncio.run() closes it. One
    that the program set is left as it is."""
    with no_wakeup_fd():
        asyncio.run(tb.run_killable(abs, -1))
        assert signal.set_wakeup_fd(-1) == -1

        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            signal.set_wakeup_fd(writer.fileno())
            asyncio.run(tb.run_killable(abs, -1))
            assert signal.set_wakeup_fd(-1) == writer.fileno()
        finally:
            reader.close()
            writer.close()


def test_the_loops_signal_wakeup_is_taken_back_when_closed_by_hand() -> None:
    """A loop closed by hand, its tasks not cancelled, gives the wakeup back too: no
    signal may write to the number of a closed file (or of one opened since)."""
    with no_wakeup_fd():
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(tb.run_killable(abs, -1))
            assert signal.set_wakeup_fd(-1) == loop._csock.fileno()  # type: ignore[attr-defined]
            signal.set_wakeup_fd(loop._csock.fileno())  # type: ignore[attr-defined]  # back
        finally:
            loop.close()
        assert signal.set_wakeup_fd(-1) == -1
