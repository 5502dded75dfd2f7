"""What a target sees: the token, check_cancelled, sleep, uninterruptible."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import threadbridge as tb

from .helpers import RungWatcher, Signal, spin_until

pytestmark = pytest.mark.anyio


def test_helpers_outside_a_target() -> None:
    """Outside a target: never cancelled, check is a no-op, current_token() explains."""
    assert tb.cancel_requested() is False
    tb.check_cancelled()
    tb.sleep(0)
    with tb.uninterruptible():
        pass
    with pytest.raises(RuntimeError, match="inside a target"):
        tb.current_token()


def test_sleep_rejects_bad_lengths() -> None:
    """sleep() refuses negative, NaN and non-number lengths."""
    with pytest.raises(ValueError, match="zero or more"):
        tb.sleep(-1)
    with pytest.raises(ValueError, match="zero or more"):
        tb.sleep(float("nan"))
    with pytest.raises(TypeError):
        tb.sleep("1")  # type: ignore[arg-type]


async def test_token_inside_target() -> None:
    """Inside a target the token starts clear."""

    def target() -> tuple[bool, bool, bool]:
        token = tb.current_token()
        return token.is_set(), tb.cancel_requested(), token.wait(0)

    assert await tb.run_killable(target) == (False, False, False)


async def test_sleep_wakes_up_at_rung1() -> None:
    """threadbridge.sleep() raises TargetCancelled as soon as the token is set."""
    started = Signal()
    events: list[str] = []

    slept: list[float] = []

    def sleeper() -> None:
        started.set()
        t0 = time.monotonic()
        try:
            tb.sleep(60)
        except tb.TargetCancelled:
            events.append("woke")
            raise
        finally:
            slept.append(time.monotonic() - t0)

    handle = tb.spawn(sleeper, policy=tb.Policy(grace=60))
    with anyio.CancelScope() as scope:
        await started.wait()
        scope.cancel()
        await handle
    assert events == ["woke"]
    assert slept[0] < 30  # woken by the token, not by the end of the sleep
    assert handle.stage is tb.Stage.COOPERATIVE


async def test_token_wait_returns_true_when_set() -> None:
    """Token.wait() returns True once the stop is requested."""
    started = Signal()
    seen: list[bool] = []

    def target() -> None:
        started.set()
        seen.append(tb.current_token().wait(60))

    handle = tb.spawn(target)
    await started.wait()
    assert await handle.stop() is tb.Stage.COOPERATIVE
    assert seen == [True]


async def test_uninterruptible_defers_rung2_to_block_exit() -> None:
    """Rung 2 waits for the uninterruptible block to end, then fires at its exit."""
    started = Signal()
    events: list[str] = []

    with RungWatcher() as watcher:

        def target() -> None:
            try:
                with tb.uninterruptible():
                    started.set()
                    # Stay inside the block until the ladder has tried rung 2.
                    spin_until(watcher.rung2)
                    events.append("block finished")
                events.append("after block")  # pragma: no cover - must not run
            except tb.TargetCancelled:
                events.append("TargetCancelled")
                raise

        handle = tb.spawn(target, policy=tb.Policy(grace=0, interrupt_grace=30))
        with anyio.CancelScope() as scope:
            await started.wait()
            scope.cancel()
            await handle
    assert events == ["block finished", "TargetCancelled"]
    assert handle.stage is tb.Stage.INTERRUPTED


async def test_nested_uninterruptible_fires_at_outermost_exit() -> None:
    """Nested blocks: rung 2 fires when the outermost one exits."""
    started = Signal()
    events: list[str] = []

    with RungWatcher() as watcher:

        def target() -> None:
            try:
                with tb.uninterruptible():
                    with tb.uninterruptible():
                        started.set()
                        spin_until(watcher.rung2)
                    events.append("inner exited")
                events.append("outer exited")  # pragma: no cover - must not run
            except tb.TargetCancelled:
                events.append("TargetCancelled")
                raise

        handle = tb.spawn(target, policy=tb.Policy(grace=0, interrupt_grace=30))
        with anyio.CancelScope() as scope:
            await started.wait()
            scope.cancel()
            await handle
    assert events == ["inner exited", "TargetCancelled"]


async def test_uninterruptible_does_not_hold_off_rung3() -> None:
    """An abandon cannot be held off: a target stuck in the block is abandoned."""
    started = Signal()
    release = threading.Event()

    def target() -> None:
        with tb.uninterruptible():
            started.set()
            spin_until(release)

    handle = tb.spawn(target, policy=tb.Policy(grace=0, interrupt_grace=0.05))
    try:
        with anyio.CancelScope() as scope:
            await started.wait()
            scope.cancel()
            await handle
        assert handle.stage is tb.Stage.ABANDONED
    finally:
        release.set()


async def test_interrupt_is_raised_only_once() -> None:
    """A target that swallows the interrupt and goes on is not interrupted again."""
    started = Signal()
    release = threading.Event()
    caught: list[str] = []
    ended = threading.Event()

    def target() -> None:
        for _ in range(2):
            try:
                started.set()
                spin_until(release)
            except tb.TargetCancelled:
                caught.append("caught")
        ended.set()

    handle = tb.spawn(target, policy=tb.Policy(grace=0, interrupt_grace=0.1))
    try:
        with anyio.CancelScope() as scope:
            await started.wait()
            scope.cancel()
            await handle
    finally:
        release.set()
    assert handle.stage is tb.Stage.ABANDONED
    # Counted once the abandoned target has ended: on a loaded machine its thread may
    # first run again after rung 3, and the interrupt lands then.
    assert ended.wait(10)
    assert caught == ["caught"]


async def test_contextvars_are_copied() -> None:
    """The target sees the caller's context variables; its changes stay in its copy."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller")

    def target() -> str:
        seen = var.get()
        var.set("target")
        return seen

    assert await tb.run_killable(target) == "caller"
    assert var.get() == "caller"


async def test_token_is_per_target() -> None:
    """Cancelling one target does not set another's token."""
    started_a = Signal()
    started_b = Signal()
    release_b = threading.Event()

    def a() -> None:
        started_a.set()
        tb.current_token().wait()
        tb.check_cancelled()

    def b() -> bool:
        started_b.set()
        release_b.wait()
        return tb.cancel_requested()

    ha = tb.spawn(a)
    hb = tb.spawn(b)
    await started_a.wait()
    await started_b.wait()
    assert await ha.stop() is tb.Stage.COOPERATIVE
    release_b.set()
    assert await hb is False
