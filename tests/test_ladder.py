"""The escalation ladder for thread targets: each rung reached, recorded and logged."""

from __future__ import annotations

import logging
import threading
import time

import anyio
import pytest

import threadbridge as tb

from .helpers import RungWatcher, Signal, block_in_c, spin_forever, spin_until

pytestmark = pytest.mark.anyio

FAST = tb.Policy(grace=0.05, interrupt_grace=0.05)


async def cancel_after_start(handle: tb.Handle[object], started: Signal) -> anyio.CancelScope:
    """Await ``handle`` in a scope that is cancelled once the target has started."""
    with anyio.CancelScope() as scope:
        await started.wait()
        scope.cancel()
        await handle
    return scope


async def test_plain_call_returns_result_and_stage_finished() -> None:
    """A target that is not cancelled returns its value and ends FINISHED."""
    handle = tb.spawn(lambda a, b: a + b, 2, 3)
    assert await handle == 5
    assert handle.stage is tb.Stage.FINISHED
    assert handle.done()
    assert await tb.run_killable(divmod, 7, 2) == (3, 1)


async def test_target_exception_is_reraised_as_itself() -> None:
    """The target's own exception reaches the caller unchanged."""

    def boom() -> None:
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        await tb.run_killable(boom)


async def test_rung1_cooperative_stop() -> None:
    """A target that checks its token stops at rung 1; its finally runs; no rung 2."""
    events: list[str] = []
    started = Signal()

    def target() -> None:
        try:
            started.set()
            while not tb.cancel_requested():
                pass
            events.append("saw token")
            tb.check_cancelled()
        finally:
            events.append("finally")

    with RungWatcher() as watcher:
        handle = tb.spawn(target, policy=tb.Policy(grace=30))
        scope = await cancel_after_start(handle, started)
    assert scope.cancelled_caught
    assert handle.stage is tb.Stage.COOPERATIVE
    assert events == ["saw token", "finally"]
    assert not watcher.messages
    assert handle.stopped_at is None  # rung 1 was enough: nothing was taken


async def test_rung2_interrupts_pure_python_loop() -> None:
    """A loop that never checks is interrupted at rung 2; its finally block runs."""
    events: list[str] = []
    started = Signal()

    def target() -> None:
        try:
            started.set()
            spin_forever()
        except tb.TargetCancelled:
            events.append("TargetCancelled")
            raise
        finally:
            events.append("finally")

    with RungWatcher() as watcher:
        handle = tb.spawn(target, policy=tb.Policy(grace=0.01, interrupt_grace=30))
        scope = await cancel_after_start(handle, started)
    assert scope.cancelled_caught
    assert handle.stage is tb.Stage.INTERRUPTED
    assert events == ["TargetCancelled", "finally"]
    assert any("target" in m and "rung 2" in m for m in watcher.messages)
    # Where it was as rung 2 fired: said in rung 2's record, kept as stopped_at (the
    # target's frames only, innermost last).
    (rung2,) = [m for m in watcher.messages if "rung 2" in m]
    assert "; it was at helpers.py:" in rung2
    assert rung2.endswith(" in spin_forever()")
    assert handle.stopped_at is not None
    frames = handle.stopped_at.splitlines()
    assert frames[0].endswith(", in target")  # nothing of what ran the target
    assert frames[-2].endswith(", in spin_forever")


async def test_rung3_abandons_thread_blocked_in_c_call(caplog: pytest.LogCaptureFixture) -> None:
    """A thread blocked in C cannot be interrupted: it is abandoned, logged, counted."""
    started = Signal()
    release = threading.Event()

    def blocked_in_c() -> str:
        block_in_c(started, release)
        return "late result"

    limiter = anyio.CapacityLimiter(5)
    handle = tb.spawn(blocked_in_c, policy=FAST, limiter=limiter)
    try:
        with caplog.at_level(logging.WARNING, logger="threadbridge"):
            scope = await cancel_after_start(handle, started)
        assert scope.cancelled_caught
        assert handle.stage is tb.Stage.ABANDONED
        assert tb.stats().abandoned_threads == 1
        # The abandoned thread still holds its limiter token: the limiter counts real threads.
        assert limiter.borrowed_tokens == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "blocked_in_c" in warnings[0].getMessage()
        assert "rung 3" in warnings[0].getMessage()
        # Where it is stuck, as rung 3 fired: in the wait inside block_in_c() (the
        # program's own frame first, then the standard library's innermost one).
        assert "; it was at helpers.py:" in warnings[0].getMessage()
        assert " in block_in_c(), in threading.py:" in warnings[0].getMessage()
        assert handle.stopped_at is not None
        assert "in block_in_c\n    release.wait()\n" in handle.stopped_at
    finally:
        release.set()
    with anyio.fail_after(10):
        await _until_released(limiter)
    assert tb.stats().abandoned_threads == 0


async def _until_released(limiter: anyio.CapacityLimiter) -> None:
    """Wait until every token of ``limiter`` is back, without polling."""
    async with limiter:
        pass
    while limiter.borrowed_tokens:  # each acquisition above queues behind the releases
        async with limiter:
            pass


async def test_swallowing_target_is_taken_to_rung3() -> None:
    """A target that swallows TargetCancelled is abandoned at rung 3."""
    started = Signal()
    swallowed = threading.Event()
    release = threading.Event()

    def swallower() -> None:
        try:
            started.set()
            spin_forever()
        except tb.TargetCancelled:
            swallowed.set()
        release.wait()

    handle = tb.spawn(swallower, policy=FAST)
    try:
        await cancel_after_start(handle, started)
        assert handle.stage is tb.Stage.ABANDONED
        # Rung 2 reached the target, which swallowed it: on a loaded machine the thread
        # may first run again after rung 3 (the exception still lands; nothing withdraws it).
        assert swallowed.wait(10)
    finally:
        release.set()


async def test_force_false_waits_for_the_target() -> None:
    """With force=False the cancelled await waits, shielded, until the target ends."""
    started = Signal()
    swallowed = Signal()
    release = threading.Event()
    events: list[str] = []

    def stubborn() -> None:
        try:
            started.set()
            spin_forever()
        except tb.TargetCancelled:
            events.append("swallowed")
            swallowed.set()
        release.wait()
        events.append("ended")

    # interrupt_grace=0: had force been honoured, rung 3 would fire as soon as rung 2 did,
    # while the target sits in release.wait().
    handle = tb.spawn(stubborn, policy=tb.Policy(grace=0, interrupt_grace=0, force=False))
    with RungWatcher() as watcher:
        async with anyio.create_task_group() as tg:

            async def releaser() -> None:
                await swallowed.wait()
                events.append("released")
                release.set()

            tg.start_soon(releaser)
            await cancel_after_start(handle, started)
    assert handle.stage is tb.Stage.INTERRUPTED
    assert events == ["swallowed", "released", "ended"]
    assert not watcher.rung3.is_set()


async def test_interrupt_false_skips_rung2() -> None:
    """With interrupt=False the ladder goes from rung 1 straight to rung 3."""
    started = Signal()
    release = threading.Event()
    hits: list[str] = []

    def target() -> None:
        started.set()
        try:
            while not release.is_set():
                pass
        except tb.TargetCancelled:  # pragma: no cover - must not happen
            hits.append("interrupted")
            raise

    with RungWatcher() as watcher:
        handle = tb.spawn(target, policy=tb.Policy(grace=0.01, interrupt=False, interrupt_grace=30))
        try:
            await cancel_after_start(handle, started)
        finally:
            release.set()
    assert handle.stage is tb.Stage.ABANDONED
    assert not watcher.rung2.is_set()
    assert watcher.rung3.is_set()
    assert hits == []


async def test_outcome_during_ladder_is_discarded() -> None:
    """A target that returns after the token is set: the cancellation still propagates."""
    started = Signal()

    def returns_on_token() -> str:
        started.set()
        tb.current_token().wait()
        return "value nobody sees"

    handle = tb.spawn(returns_on_token)
    scope = await cancel_after_start(handle, started)
    assert scope.cancelled_caught
    assert handle.stage is tb.Stage.COOPERATIVE


async def test_handle_cancel_then_await_raises_target_cancelled() -> None:
    """handle.cancel() without cancelling the awaiter: the await raises TargetCancelled."""
    started = Signal()

    def target() -> None:
        started.set()
        tb.sleep(60)

    handle = tb.spawn(target)
    await started.wait()
    handle.cancel()
    handle.cancel()  # idempotent
    with pytest.raises(tb.TargetCancelled):
        await handle
    assert handle.stage is tb.Stage.COOPERATIVE


async def test_handle_cancel_returns_value_of_cooperative_target() -> None:
    """A target that returns normally after its token is set hands its value over."""
    started = Signal()

    def target() -> str:
        started.set()
        tb.current_token().wait()
        return "partial"

    handle = tb.spawn(target)
    await started.wait()
    handle.cancel()
    assert await handle == "partial"


async def test_stop_returns_stage() -> None:
    """await handle.stop() climbs and returns how far it went."""
    started = Signal()

    def target() -> None:
        started.set()
        spin_forever()

    # A long interrupt_grace: rung 2 ends the target whenever its thread next runs, and
    # a loaded machine must not turn that into rung 3.
    handle = tb.spawn(target, policy=tb.Policy(grace=0.05, interrupt_grace=30))
    await started.wait()
    assert await handle.stop() is tb.Stage.INTERRUPTED
    assert await handle.stop() is tb.Stage.INTERRUPTED  # again: nothing more happens


async def test_stop_after_finish_is_finished() -> None:
    """Stopping a handle whose work already ended changes nothing."""
    handle = tb.spawn(lambda: 1)
    assert await handle == 1
    assert await handle.stop() is tb.Stage.FINISHED


async def test_ladder_total_time_is_bounded() -> None:
    """A cancelled await returns within grace + interrupt_grace plus a generous margin."""
    started = Signal()
    release = threading.Event()

    def blocked() -> None:
        block_in_c(started, release)

    handle = tb.spawn(blocked, policy=tb.Policy(grace=0.1, interrupt_grace=0.1))
    try:
        await started.wait()
        t0 = time.monotonic()
        with anyio.move_on_after(0):
            await handle
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert handle.stage is tb.Stage.ABANDONED
    assert 0.2 <= elapsed < 5


async def test_second_awaiter_sees_same_outcome() -> None:
    """Two tasks awaiting one handle both get its result."""
    gate = threading.Event()
    handle = tb.spawn(lambda: (gate.wait(), 7)[1])
    results: list[int] = []

    async def waiter() -> None:
        results.append(await handle)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert results == [7, 7]


async def test_rung2_unavailable_is_logged_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the interpreter cannot inject (PyPy), rung 2 is logged as skipped."""
    from threadbridge import _inject

    monkeypatch.setattr(_inject, "CAN_INJECT", False)
    started = Signal()
    release = threading.Event()

    def target() -> None:
        started.set()
        spin_until(release)

    with RungWatcher() as watcher:
        handle = tb.spawn(target, policy=tb.Policy(grace=0, interrupt_grace=0))
        try:
            await cancel_after_start(handle, started)
        finally:
            release.set()
    assert handle.stage is tb.Stage.ABANDONED
    assert any("not available on this interpreter" in m for m in watcher.messages)


async def test_stop_before_start_is_cooperative_whatever_the_graces() -> None:
    """Stopped the moment it is spawned, with no grace at all, a target that a thread had
    not picked up yet never runs, and ends COOPERATIVE: never INTERRUPTED or ABANDONED by
    whichever rung got there first."""
    never_ran = 0
    for _ in range(20):
        ran: list[str] = []
        handle = tb.spawn(ran.append, "ran", policy=tb.Policy(grace=0, interrupt_grace=0))
        stage = await handle.stop()
        if not ran:
            never_ran += 1
            assert stage is tb.Stage.COOPERATIVE
            with pytest.raises(tb.TargetCancelled, match="append was stopped before it started"):
                await handle
    assert never_ran  # the cancel did come first, at least sometimes


async def test_log_messages_do_not_repeat_the_logger_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Rung 2 and rung 3 are logged on the threadbridge logger, without a prefix that
    repeats its name."""
    started, release = Signal(), threading.Event()

    def target() -> None:
        started.set()
        try:
            spin_forever()
        except tb.TargetCancelled:
            spin_until(release)  # swallows rung 2: rung 3 comes

    caplog.set_level(logging.INFO, logger="threadbridge")
    handle = tb.spawn(target, policy=tb.Policy(grace=0.01, interrupt_grace=0.01))
    await started.wait()
    try:
        assert await handle.stop() is tb.Stage.ABANDONED
    finally:
        release.set()
    messages = [r.getMessage() for r in caplog.records if r.name == "threadbridge"]
    assert any("rung 2" in m for m in messages)
    assert any("rung 3" in m for m in messages)
    assert not [m for m in messages if m.startswith("threadbridge")]
