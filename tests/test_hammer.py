"""2,000 cancellations at random moments, many right as targets return."""

from __future__ import annotations

import random
import threading
from typing import Any

import anyio
import pytest

import threadbridge as tb
from threadbridge import _stats
from threadbridge._target import TargetState

from .helpers import until_parked

pytestmark = pytest.mark.anyio

CALLS = 2000
CONCURRENCY = 20


def busy_then_return(i: int, n: int) -> tuple[str, int]:
    """A pure-Python loop of n steps that never checks its token."""
    total = 0
    for step in range(n):
        total += step
    return ("ok", i)


def cooperative(i: int, n: int) -> tuple[str, int]:
    """The same loop, checking its token on every step."""
    for _ in range(n):
        tb.check_cancelled()
    return ("ok", i)


async def test_hammer_random_cancellations() -> None:
    """No pooled thread is lost, no result goes astray, threads return to baseline."""
    rng = random.Random(20261125)
    baseline = {t for t in threading.enumerate() if not t.name.startswith("threadbridge-")}
    # Rung 2 at once: injections land anywhere, including in a target that is returning.
    interrupt_now = tb.Policy(grace=0, interrupt_grace=30)
    polite = tb.Policy(grace=30)
    outcomes = {"returned": 0, "cancelled": 0}
    wrong: list[object] = []

    async def caller(i: int) -> None:
        cooperative_target = rng.random() < 0.3
        target = cooperative if cooperative_target else busy_then_return
        policy = polite if cooperative_target else interrupt_now
        n = rng.randrange(0, 3000)
        delay = rng.choice([0, rng.uniform(0, 0.0005), rng.uniform(0, 0.003), 0.05])
        use_handle = rng.random() < 0.2
        with anyio.move_on_after(delay) as scope:
            if use_handle:
                result = await tb.spawn(target, i, n, policy=policy)
            else:
                result = await tb.run_killable(target, i, n, policy=policy)
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1
        else:
            outcomes["returned"] += 1
            if result != ("ok", i):
                wrong.append((i, result))

    limiter = anyio.CapacityLimiter(CONCURRENCY)

    async def bounded(i: int) -> None:
        async with limiter:
            await caller(i)

    with anyio.fail_after(240):
        async with anyio.create_task_group() as tg:
            for i in range(CALLS):
                tg.start_soon(bounded, i)

    assert wrong == []
    assert outcomes["returned"] + outcomes["cancelled"] == CALLS
    # Both kinds must really happen, or the test proves nothing.
    assert outcomes["cancelled"] > CALLS // 10, outcomes
    assert outcomes["returned"] > CALLS // 10, outcomes

    stats = tb.stats()
    assert stats.busy_threads == 0
    assert stats.abandoned_threads == 0, "a pure-Python target outlived rung 2"
    assert _stats.wait_quiet(0)
    # A pool thread killed by a stray injection would still be counted but not alive.
    alive = [t for t in threading.enumerate() if t.name == "threadbridge-worker"]
    assert len(alive) >= stats.threads
    # The pool still serves calls on every thread it has.
    results = []
    async with anyio.create_task_group() as tg:
        for i in range(100):

            async def one(i: int = i) -> None:
                results.append(await tb.run_killable(busy_then_return, i, 10))

            tg.start_soon(one)
    assert sorted(results) == [("ok", i) for i in range(100)]
    others = {t for t in threading.enumerate() if not t.name.startswith("threadbridge-")}
    assert others <= baseline | {t for t in others if t.name.startswith(("Trio thread",))}


@pytest.mark.parametrize("trailing_calls", [0, 1, 2, 5])
async def test_injection_at_return_stays_out_of_the_pool(trailing_calls: int) -> None:
    """An interrupt that fires as the target returns is absorbed; the thread lives on."""
    from threadbridge import _token

    ran_on: list[threading.Thread] = []

    def target() -> str:
        ran_on.append(threading.current_thread())
        state = _token._local.state
        if not isinstance(state, TargetState):
            return "not run as a target"
        # Rung 2 at the very end: it fires in the target's last steps or in the pool's
        # bookkeeping right after (where it is withdrawn), never later.
        state.request_interrupt()
        for _ in range(trailing_calls):
            len(())
        return "returned"

    handle = tb.spawn(target)
    try:
        assert await handle == "returned"  # withdrawn as the target returned
    except tb.TargetCancelled:
        pass  # fired in the target's last steps
    assert handle.stage is tb.Stage.INTERRUPTED  # rung 2 reached the running target
    # An exception escaping into the pool thread would reach threading.excepthook,
    # which this suite turns into an error.
    # The same pool thread serves the next calls, untouched.
    threads = {await tb.run_killable(threading.current_thread) for _ in range(5)}
    assert all(t.is_alive() for t in threads)
    assert await tb.run_killable(lambda: "clean") == "clean"


async def test_injection_just_before_the_target_stays_out_of_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rung 2 landing between "marked running" and the target's first line is caught:
    the call ends INTERRUPTED and its pool thread lives on."""
    from threadbridge import _thread

    original = _thread.ThreadWork._call

    def interrupt_then_call(self: _thread.ThreadWork) -> Any:
        self.request_interrupt()  # fires at the next bytecode boundary, right here
        return original(self)

    monkeypatch.setattr(_thread.ThreadWork, "_call", interrupt_then_call)
    ran: list[str] = []
    handle = tb.spawn(lambda: ran.append("target ran"))
    with pytest.raises(tb.TargetCancelled):
        await handle
    assert handle.stage is tb.Stage.INTERRUPTED
    assert ran == []
    monkeypatch.setattr(_thread.ThreadWork, "_call", original)
    threads = {await tb.run_killable(threading.current_thread) for _ in range(5)}
    assert all(t.is_alive() for t in threads)
    assert tb.stats().busy_threads == 0


@pytest.mark.parametrize("plain", [False, True], ids=["run_killable", "executor"])
async def test_injection_as_the_target_is_marked_ended_leaves_its_lock_free(
    monkeypatch: pytest.MonkeyPatch, plain: bool
) -> None:
    """Rung 2 pending as the target's thread takes the target's lock to mark it ended
    fires as that lock is taken (the first check after it): the lock is given back, the
    call ends with the target's value, and the lock is free for the rungs and listings
    that take it later; the pool thread lives on."""
    from threadbridge import _inject, _locks, _target, _thread

    original = _thread.ThreadWork._call
    works: list[_thread.ThreadWork] = []
    returned, go = threading.Event(), threading.Event()
    results: list[object] = []

    def call_then_hold(self: _thread.ThreadWork) -> Any:
        outcome = original(self)
        works.append(self)
        returned.set()
        go.wait(30)  # until the lock is held elsewhere
        return outcome

    async def call_it() -> None:
        if plain:
            with tb.Executor() as ex:
                future = ex.submit(lambda: "value")
                results.append(await anyio.to_thread.run_sync(future.result, 30))
        else:
            results.append(await tb.run_killable(lambda: "value"))

    # Where the pool thread waits for the target's lock: in run_target() itself (a C
    # lock's __enter__), or, on 3.14, in the lock's own Python __enter__.
    taking_the_lock = {_target.TargetState.run_target.__code__, _locks.SafeLock.__enter__.__code__}
    monkeypatch.setattr(_thread.ThreadWork, "_call", call_then_hold)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_it)
            assert await anyio.to_thread.run_sync(returned.wait, 30)
            (work,) = works
            (thread,) = [t for t in threading.enumerate() if t.ident == work.thread_id]
            work.lock.acquire()  # free: the target's thread holds nothing in the target
            try:
                go.set()
                await until_parked(thread, taking_the_lock)
                work.interrupted = work.pending = True  # what request_interrupt() records
                _inject.inject(work.thread_id)
            finally:
                work.lock.release()  # its acquire() returns, and rung 2 fires there
    finally:
        go.set()
    assert results == ["value"]
    monkeypatch.setattr(_thread.ThreadWork, "_call", original)
    (work,) = works
    assert (work.running, work.pending) == (False, False)
    assert work.lock.acquire(timeout=5)  # free: not left held by the pool thread
    work.lock.release()
    assert work.where_now().startswith("(not running")
    threads = {await tb.run_killable(threading.current_thread) for _ in range(5)}
    assert all(t.is_alive() for t in threads)
    assert tb.stats().busy_threads == 0
