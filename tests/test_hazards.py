"""What rung 2 can and cannot do: the hazards of raising inside a running thread.

These tests document behaviour rather than hide it. Each asserts what really happens on
the running CPython, so a change in the interpreter shows up here first (and the docs
page on rung 2 must then change with it).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import threadbridge as tb

from .helpers import (
    RungWatcher,
    Signal,
    spin_forever,
    spin_until,
    traced_call_returns,
    until_blocked_in_wait,
    until_running,
)

pytestmark = pytest.mark.anyio

POLICY = tb.Policy(grace=0, interrupt_grace=30)
_go = True


def _noop() -> None:
    pass


def _loop_in_callee() -> None:
    while True:
        pass


# fmt: off
def shape_while_true_one_line(done: list[str]) -> None:
    try:
        while True: pass  # noqa: E701 - the shape under test
    finally:
        done.append("handler")


def shape_while_true_one_line_except(done: list[str]) -> None:
    try:
        while True: pass  # noqa: E701 - the shape under test
    except tb.TargetCancelled:
        done.append("handler")
        raise
# fmt: on


def shape_while_true_two_lines(done: list[str]) -> None:
    try:
        while True:
            pass
    finally:
        done.append("handler")


def shape_while_flag(done: list[str]) -> None:
    try:
        while _go:
            pass
    finally:
        done.append("handler")


def shape_loop_in_callee(done: list[str]) -> None:
    try:
        _loop_in_callee()
    finally:
        done.append("handler")


V = sys.version_info[:2]
# Where CPython loses the handler of a `try` around a tight loop when an exception is
# injected into it: it is raised at the loop's backward jump with an instruction offset
# that the exception table does not cover. Measured on 3.10.13, 3.11.7, 3.12.1, 3.13.0,
# 3.13.15 free-threaded and 3.14.10, the same in every run.
SHAPES: list[tuple[Callable[[list[str]], None], bool]] = [
    (shape_while_true_one_line, V in ((3, 11), (3, 12))),
    (shape_while_true_one_line_except, V in ((3, 11), (3, 12))),
    (shape_while_true_two_lines, False),
    (shape_while_flag, V == (3, 13)),
    (shape_loop_in_callee, False),
]


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="rung 2 is CPython's")
@pytest.mark.parametrize(
    ("shape", "handler_skipped"), SHAPES, ids=lambda x: getattr(x, "__name__", str(x))
)
async def test_handler_of_tight_loop(
    shape: Callable[[list[str]], None], handler_skipped: bool
) -> None:
    """Documents which tight loops lose their finally/except when rung 2 lands."""
    done: list[str] = []
    started = Signal()
    ident: list[int] = []

    def target() -> None:
        ident.append(threading.get_ident())
        started.set()
        shape(done)

    handle = tb.spawn(target, policy=POLICY)
    with anyio.CancelScope() as scope:
        await started.wait()
        if shape is shape_loop_in_callee:
            await until_running(ident[0], _loop_in_callee.__code__, 1)
        else:
            await until_running(ident[0], shape.__code__, 2)  # def, try, the loop
        scope.cancel()
        await handle
    # Either way the target ended and its pool thread survived.
    assert handle.stage is tb.Stage.INTERRUPTED
    assert done == ([] if handler_skipped else ["handler"])
    assert await tb.run_killable(lambda: "pool still works") == "pool still works"


async def _cancelled_once(target: Callable[[], None], started: Signal) -> tb.Handle[None]:
    """Spawn ``target`` (rung 2 at once), cancel it once it has said it started, and
    wait for the ladder to end: the handle, settled."""
    handle = tb.spawn(target, policy=POLICY)
    with anyio.CancelScope() as scope:
        await started.wait()
        scope.cancel()
        await handle
    return handle


class SlowLockGuard:
    """A Python-level context manager that takes a lock, then does slow setup."""

    def __init__(self, lock: threading.Lock, entered: Signal, proceed: threading.Event):
        self.lock = lock
        self.entered = entered
        self.proceed = proceed

    def __enter__(self) -> SlowLockGuard:
        self.lock.acquire()
        self.entered.set()
        spin_until(self.proceed)  # setup after the lock is held
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="rung 2 is CPython's")
async def test_python_level_context_manager_leaves_lock_held() -> None:
    """Rung 2 landing in a Python __enter__ skips __exit__: the lock stays held."""
    lock = threading.Lock()
    entered = Signal()
    never = threading.Event()

    def target() -> None:
        with SlowLockGuard(lock, entered, never):
            pass  # pragma: no cover - never reached

    handle = await _cancelled_once(target, entered)
    assert handle.stage is tb.Stage.INTERRUPTED
    assert lock.locked(), "the hazard: __exit__ never ran, the lock is left held"
    lock.release()


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="rung 2 is CPython's")
async def test_uninterruptible_keeps_the_lock_consistent() -> None:
    """The same guard inside uninterruptible(): rung 2 waits, the lock is released."""
    lock = threading.Lock()
    entered = Signal()
    from .helpers import RungWatcher

    with RungWatcher() as watcher:

        def target() -> None:
            with tb.uninterruptible(), SlowLockGuard(lock, entered, watcher.rung2):
                pass
            tb.sleep(60)  # pragma: no cover - rung 2 fires as the block exits

        handle = await _cancelled_once(target, entered)
    assert handle.stage is tb.Stage.INTERRUPTED
    assert not lock.locked()


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="rung 2 is CPython's")
async def test_uninterruptible_around_a_lock_never_leaves_it_held() -> None:
    """What docs/hazards.md advises for a lock on CPython 3.14 (where rung 2 landing just
    after a plain `with lock:` enters leaves the lock held): `with uninterruptible(),
    lock:` in a loop, interrupted by rung 2 a hundred times, never leaves it held."""
    lock = threading.Lock()
    for _ in range(100):
        started = Signal()

        def target(started: Signal = started) -> None:
            started.set()
            while True:
                with tb.uninterruptible(), lock:
                    pass

        handle = await _cancelled_once(target, started)
        assert handle.stage is tb.Stage.INTERRUPTED
        assert not lock.locked()


def _read_one(fd: int, events: list[str]) -> None:
    os.read(fd, 1)  # blocks in C until the test writes
    events.append("read returned")
    spin_until(threading.Event())


class BlockedReader:
    """A target that blocks in os.read on a pipe until the test writes to it."""

    def __init__(self, *, reraise: bool) -> None:
        self.r, self.w = os.pipe()
        self.started = Signal()
        self.events: list[str] = []
        self.ended = threading.Event()
        self.ident = 0
        self.reraise = reraise

    def target(self) -> None:
        self.ident = threading.get_ident()
        self.started.set()
        try:
            _read_one(self.r, self.events)
        except tb.TargetCancelled:
            self.events.append("TargetCancelled after the C call")
            if self.reraise:
                raise
        finally:
            self.ended.set()

    async def until_blocked(self) -> None:
        """Until the target is in _read_one's first line: about to block in, or blocked
        in, os.read."""
        await self.started.wait()
        await until_running(self.ident, _read_one.__code__, 1)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


async def test_nothing_lands_inside_a_blocking_c_call() -> None:
    """A thread blocked in C is abandoned; the injection lands once the call returns."""
    reader = BlockedReader(reraise=False)
    try:
        handle = tb.spawn(reader.target, policy=tb.Policy(grace=0.1, interrupt_grace=0.1))
        with anyio.CancelScope() as scope:
            await reader.until_blocked()
            scope.cancel()
            await handle
        assert handle.stage is tb.Stage.ABANDONED
        assert reader.events == []
        os.write(reader.w, b"x")
        assert reader.ended.wait(10)
    finally:
        reader.close()
    if sys.implementation.name == "cpython":
        # Where exactly it lands after the read returns is up to the interpreter.
        assert reader.events in (
            ["TargetCancelled after the C call"],
            ["read returned", "TargetCancelled after the C call"],
        )


async def test_traced_code_runs_while_an_injection_waits_in_c() -> None:
    """Rung 2 pending in a thread blocked in C does not freeze traced code elsewhere.

    CPython before 3.13 keeps one "exception pending" flag per interpreter; on 3.11 a
    function called under sys.settrace (coverage, debuggers) spins at its first
    instruction for as long as that flag is set. threadbridge clears the flag right after
    injecting; the target still gets its exception once the C call returns.
    """
    reader = BlockedReader(reraise=True)
    try:
        with RungWatcher() as watcher:
            handle = tb.spawn(reader.target, policy=POLICY)
            await reader.until_blocked()
            handle.cancel()
            await watcher.wait_rung2()
        assert traced_call_returns()
        os.write(reader.w, b"x")
        assert await handle.stop() is tb.Stage.INTERRUPTED
    finally:
        reader.close()
    assert reader.events[-1] == "TargetCancelled after the C call"


async def test_withdrawn_injection_leaves_nothing_behind() -> None:
    """An injection withdrawn before it fired leaves no flag that freezes traced code."""
    from threadbridge import _inject

    release = threading.Event()
    outcome: list[str] = []

    def blocked() -> None:
        try:
            release.wait()
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=blocked, daemon=True)
    thread.start()
    assert thread.ident is not None
    # Injected only once the thread waits inside the C call: an injection made while it
    # still runs bytecode would fire before it is withdrawn (at once, where there is no
    # GIL: a 3.13t run saw it).
    await until_blocked_in_wait(thread)
    _inject.inject(thread.ident)
    _inject.clear_injection(thread.ident)
    assert traced_call_returns()
    release.set()
    thread.join(10)
    assert outcome == ["returned"]


async def test_except_exception_does_not_swallow_target_cancelled() -> None:
    """TargetCancelled is a BaseException: `except Exception` lets it through."""
    started = Signal()
    swallowed: list[str] = []

    def target() -> None:
        started.set()
        while True:
            try:
                tb.check_cancelled()
            except Exception:  # pragma: no cover - must not catch it
                swallowed.append("swallowed")

    handle = tb.spawn(target)
    await started.wait()
    assert await handle.stop() is tb.Stage.COOPERATIVE
    assert swallowed == []


class _Churned:
    """An object whose __del__ runs Python code: a place where rung 2 may fire, and where
    CPython would drop it."""

    def __del__(self) -> None:
        for _ in range(100):
            pass


def _churn_dels(started: Signal) -> None:
    started.set()
    while True:
        _Churned()


def _churn_gc_callback(started: Signal) -> None:
    import gc

    def callback(phase: str, info: dict[str, int]) -> None:
        for _ in range(2000):
            pass

    gc.callbacks.append(callback)
    try:
        started.set()
        while True:
            cycle: list[object] = []
            cycle.append(cycle)  # garbage for the collector, which runs the callback
    finally:
        gc.callbacks.remove(callback)


class _OwnUnraisable(Exception):
    """What the target's own __del__ raises: CPython hands it to sys.unraisablehook."""


class _RaisesInDel:
    def __del__(self) -> None:
        raise _OwnUnraisable


def _raises_one_unraisable() -> None:
    _RaisesInDel()  # its exception goes to the unraisable hook
    spin_forever()


class _HoldsOffInDel:
    """Its __del__ runs an uninterruptible() block that waits for ``go``: rung 2 is held
    off until the block ends, and then raised inside the __del__."""

    def __init__(self, inside: Signal, go: threading.Event) -> None:
        self.inside = inside
        self.go = go

    def __del__(self) -> None:
        with tb.uninterruptible():
            self.inside.set()
            self.go.wait()


def _held_off_in_del(inside: Signal, go: threading.Event) -> None:
    _HoldsOffInDel(inside, go)  # dropped at once: its __del__ runs here
    spin_forever()


async def test_rung2_held_off_then_raised_in_a_del_is_delivered_again() -> None:
    """Rung 2 held off by uninterruptible() fires as the block ends: inside a __del__
    CPython drops it, and it is delivered again."""
    inside, go = Signal(), threading.Event()
    with RungWatcher() as watcher:
        handle = tb.spawn(_held_off_in_del, inside, go, policy=POLICY)
        await inside.wait()
        handle.cancel()
        await watcher.wait_rung2()
    go.set()
    with anyio.fail_after(20):
        assert await handle.stop() is tb.Stage.INTERRUPTED


@pytest.mark.parametrize("shape", [_churn_dels, _churn_gc_callback])
async def test_rung2_is_delivered_again_when_dropped(shape: Any) -> None:
    """Rung 2 landing in a __del__ or a gc callback (where CPython drops exceptions) is
    delivered again: INTERRUPTED every time, and no "Exception ignored" report (which this
    suite turns into an error)."""
    await _stopped_by_rung2_every_time(shape)


async def test_rung2_landing_in_an_unraisable_hook_is_delivered_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The target's own unraisable exception goes to a hook written in Python (pytest's,
    or the user's), set before the target ran: rung 2 landing inside that hook, where
    CPython drops exceptions too, is delivered again once the hook has returned."""
    previous = sys.unraisablehook
    in_hook = Signal()

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not _OwnUnraisable:
            previous(unraisable)
            return
        in_hook.set()
        spin_forever()  # until rung 2 lands here

    monkeypatch.setattr(sys, "unraisablehook", hook)
    handle = tb.spawn(_raises_one_unraisable, policy=POLICY)
    await in_hook.wait()
    with anyio.fail_after(20):
        assert await handle.stop() is tb.Stage.INTERRUPTED


async def _stopped_by_rung2_every_time(shape: Callable[[Signal], None]) -> None:
    for _ in range(10):
        started = Signal()
        handle = tb.spawn(shape, started, policy=tb.Policy(grace=0, interrupt_grace=30))
        await started.wait()
        with anyio.fail_after(20):
            assert await handle.stop() is tb.Stage.INTERRUPTED
