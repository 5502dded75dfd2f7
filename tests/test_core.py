"""The ladder and the run, driven by a fake backend and a hand-turned clock.

No threads, no processes, no event loop: every rung and every race between "the target
ended" and "the ladder forced it" is played out in order, in milliseconds. The backends'
own tests (test_ladder, test_process) check the same contract against real threads and
workers.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import threadbridge as tb
from threadbridge import _backend, _internal, _scheduler
from threadbridge._ladder import Ending, Run, Rung, decide_stage
from threadbridge._loop import Waitable

FAST = tb.Policy(grace=1.0, interrupt_grace=2.0)


class FakeClock:
    """A scheduler whose time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, _scheduler.Timer]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, fn: Callable[[], None]) -> _scheduler.Timer:
        timer = _scheduler.Timer(fn)
        if not math.isinf(delay):
            heapq.heappush(self._heap, (self.now + delay, next(self._seq), timer))
        return timer

    def pending(self) -> int:
        return sum(1 for _, _, timer in self._heap if timer.fn is not None)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            when, _, timer = heapq.heappop(self._heap)
            self.now = when
            fn, timer.fn = timer.fn, None
            if fn is not None:
                fn()
        self.now = end


class FakeLink:
    """Runs what the run posts at once, as if the loop were always ready."""

    def __init__(self) -> None:
        self.posted = 0

    @property
    def key(self) -> object:
        return self

    def post(self, fn: Callable[[], object]) -> bool:
        self.posted += 1
        fn()
        return True

    def call(self, fn: Callable[[], object]) -> bool:
        fn()
        return True

    def wake(self, run: Waitable) -> None:
        run.settled = True


class FakeLimiter:
    def __init__(self) -> None:
        self.held: set[object] = set()
        self.released = 0

    def acquire_on_behalf_of_nowait(self, borrower: object) -> None:
        self.held.add(borrower)

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        self.held.add(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        if borrower not in self.held:
            raise RuntimeError("not held")
        self.held.remove(borrower)
        self.released += 1


class FakeWork:
    """Records what the ladder asked of it; ``running`` says what interrupt() answers."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = True

    def request_stop(self) -> None:
        self.calls.append("stop")

    def interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        self.calls.append("interrupt")
        if self.running and announce is not None:
            announce()
        return self.running

    def force(self) -> None:
        self.calls.append("force")

    def describe(self) -> str:
        return "fake work"


def make_run(
    policy: tb.Policy = FAST, clock: FakeClock | None = None
) -> tuple[Run, FakeWork, FakeClock, FakeLimiter]:
    clock = clock or FakeClock()
    limiter = FakeLimiter()
    run = Run("target", policy, FakeLink(), limiter, scheduler=clock)  # type: ignore[arg-type]
    limiter.acquire_on_behalf_of_nowait(run)
    work = FakeWork()
    run.attach(work)
    return run, work, clock, limiter


@pytest.fixture
def recorded_violations() -> Any:
    """For tests that provoke a contract violation on purpose: hand them over, then
    clear them so that the suite's own check passes."""
    start = len(_internal.violations)
    found: list[str] = []
    yield found
    found += _internal.violations[start:]
    del _internal.violations[start:]


def test_decide_stage_table() -> None:
    """Every combination of ending, rung-2 delivery and ladder rung gives one stage."""
    expected = {
        (Ending.ENDED, False, Rung.NONE): tb.Stage.FINISHED,
        (Ending.ENDED, False, Rung.STOP): tb.Stage.COOPERATIVE,
        (Ending.ENDED, False, Rung.INTERRUPT): tb.Stage.COOPERATIVE,
        (Ending.ENDED, True, Rung.INTERRUPT): tb.Stage.INTERRUPTED,
        (Ending.ENDED, True, Rung.FORCE): tb.Stage.INTERRUPTED,
        (Ending.NOT_STARTED, False, Rung.NONE): tb.Stage.FINISHED,
        (Ending.NOT_STARTED, False, Rung.STOP): tb.Stage.COOPERATIVE,
        (Ending.NOT_STARTED, False, Rung.FORCE): tb.Stage.COOPERATIVE,
        (Ending.ABANDONED, False, Rung.FORCE): tb.Stage.ABANDONED,
        (Ending.KILLED, True, Rung.FORCE): tb.Stage.KILLED,
    }
    for (ending, interrupted, rung), stage in expected.items():
        assert decide_stage(ending, interrupted=interrupted, rung=rung) is stage, (ending, rung)


def test_finish_without_cancel() -> None:
    """A run that ends by itself is FINISHED, gives its token back once, wakes waiters."""
    run, work, _clock, limiter = make_run()
    run.report(Ending.ENDED, (True, 5))
    assert run.stage is tb.Stage.FINISHED
    assert run.settled
    assert limiter.released == 1
    assert run.result() == 5
    assert work.calls == []


def test_rung1_is_synchronous_and_rung2_waits_for_grace() -> None:
    """cancel() sets the token inside the call; rung 2 comes exactly after grace."""
    run, work, clock, _ = make_run()
    run.cancel()
    assert work.calls == ["stop"]
    clock.advance(0.999)
    assert work.calls == ["stop"]
    clock.advance(0.001)
    assert work.calls == ["stop", "interrupt"]
    assert run.rung is Rung.INTERRUPT
    clock.advance(1.999)
    assert work.calls == ["stop", "interrupt"]
    clock.advance(0.001)
    assert work.calls == ["stop", "interrupt", "force"]
    assert run.rung.name == "FORCE"  # (mypy narrows the property)


def test_cancel_is_idempotent() -> None:
    """A second cancel() neither sets the token again nor schedules a second ladder."""
    run, work, clock, _ = make_run()
    run.cancel()
    run.cancel()
    clock.advance(10)
    assert work.calls == ["stop", "interrupt", "force"]


def test_cooperative_end_withdraws_the_ladder() -> None:
    """Ending after rung 1 is COOPERATIVE, and no later rung is ever tried."""
    run, work, clock, _ = make_run()
    run.cancel()
    run.report(Ending.ENDED, (False, tb.TargetCancelled("stop")))
    assert run.stage is tb.Stage.COOPERATIVE
    assert clock.pending() == 0
    clock.advance(100)
    assert work.calls == ["stop"]


def test_interrupted_end() -> None:
    """Ending after rung 2 reached the target is INTERRUPTED; rung 3 is withdrawn."""
    run, work, clock, _ = make_run()
    run.cancel()
    clock.advance(1.0)
    run.report(Ending.ENDED, (False, tb.TargetCancelled("rung 2")), interrupted=True)
    assert run.stage is tb.Stage.INTERRUPTED
    clock.advance(100)
    assert work.calls == ["stop", "interrupt"]
    with pytest.raises(tb.TargetCancelled, match="rung 2"):
        run.result()


def test_no_interrupt_goes_from_grace_to_force() -> None:
    """Policy(interrupt=False): rung 3 right after grace, rung 2 never."""
    run, work, clock, _ = make_run(tb.Policy(grace=1.0, interrupt=False, interrupt_grace=50))
    run.cancel()
    clock.advance(1.0)
    assert work.calls == ["stop", "force"]


def test_no_force_never_forces() -> None:
    """Policy(force=False): the ladder stops at rung 2, however long the wait."""
    run, work, clock, _ = make_run(tb.Policy(grace=1.0, interrupt_grace=1.0, force=False))
    run.cancel()
    clock.advance(1e6)
    assert work.calls == ["stop", "interrupt"]
    assert run.stage is tb.Stage.RUNNING
    run.report(Ending.ENDED, (True, None))
    assert run.stage.name == "COOPERATIVE"  # (mypy narrows the property)


@pytest.mark.parametrize("ending", [Ending.ABANDONED, Ending.KILLED])
def test_forced(ending: Ending) -> None:
    """The backend's report of a forced run decides ABANDONED or KILLED; the await sees
    TargetCancelled that names rung 3."""
    run, _work, clock, limiter = make_run()
    run.cancel()
    clock.advance(3.0)
    run.report(ending, release=ending is Ending.KILLED)
    assert run.stage.value == ending.value
    with pytest.raises(tb.TargetCancelled, match="rung 3"):
        run.result()
    if ending is Ending.ABANDONED:
        assert limiter.released == 0  # the thread still runs: its token stays taken
        run.release()
    assert limiter.released == 1


def test_ended_just_before_forced() -> None:
    """The target ends while rung 3 is on its way: the backend reports the end (force()
    finds nothing to do), and the stage says how it really ended."""
    run, work, clock, _ = make_run()
    run.cancel()
    clock.advance(1.0)
    work.running = False
    run.report(Ending.ENDED, (True, 1), interrupted=True)
    clock.advance(2.0)
    assert work.calls == ["stop", "interrupt"]
    assert run.stage is tb.Stage.INTERRUPTED


def test_forced_then_late_end_is_a_violation(recorded_violations: list[str]) -> None:
    """A backend that reports twice breaks the contract: the first report stands, the
    token is given back once, and the violation is recorded (the suite fails on it)."""
    run, _work, clock, limiter = make_run()
    run.cancel()
    clock.advance(3.0)
    run.report(Ending.KILLED)
    run.report(Ending.ENDED, (True, 1))
    assert run.stage is tb.Stage.KILLED
    assert limiter.released == 1
    assert len(_internal.violations) >= 1
    assert "reported ended after it settled" in _internal.violations[-1]


def test_token_given_back_twice_is_a_violation(recorded_violations: list[str]) -> None:
    """Giving back a limiter token the run does not hold is recorded, not raised in the
    loop (where it would take the loop down)."""
    run, _work, _clock, _limiter = make_run()
    run.report(Ending.ENDED, (True, 1))
    run.release()
    assert "did not hold" in _internal.violations[-1]


def test_stop_before_start() -> None:
    """A run stopped before its target started ends COOPERATIVE and says so."""
    run, _work, _clock, _ = make_run()
    run.cancel()
    run.report(Ending.NOT_STARTED)
    assert run.stage is tb.Stage.COOPERATIVE
    with pytest.raises(tb.TargetCancelled, match="target was stopped before it started"):
        run.result()


def test_attach_after_cancel_requests_stop() -> None:
    """Work attached after a cancel gets its token set at once."""
    clock = FakeClock()
    run = Run("target", FAST, FakeLink(), FakeLimiter(), scheduler=clock)  # type: ignore[arg-type]
    run.cancel()
    work = FakeWork()
    run.attach(work)
    assert work.calls == ["stop"]
    clock.advance(1.0)
    assert work.calls == ["stop", "interrupt"]


def test_attach_after_settle_is_ignored() -> None:
    """A run that has settled keeps no reference to work attached late."""
    run, _, _clock, _ = make_run()
    run.report(Ending.ENDED, (True, 1))
    late = FakeWork()
    run.attach(late)
    run.cancel()
    assert late.calls == []


class Result:
    """A result that can be weakly referenced."""


def test_settled_runs_are_collectable_whatever_the_grace() -> None:
    """The real scheduler keeps nothing of a run alive once it has settled, even with
    a rung 2 scheduled an hour away (nor its result)."""
    refs = []
    for _ in range(100):
        limiter = FakeLimiter()
        run = Run("target", tb.Policy(grace=3600), FakeLink(), limiter)  # type: ignore[arg-type]
        limiter.acquire_on_behalf_of_nowait(run)
        run.attach(FakeWork())
        run.cancel()
        result = Result()
        run.report(Ending.ENDED, (True, result))
        refs.append((weakref.ref(run), weakref.ref(result)))
        del run, result, limiter
    gc.collect()
    assert [r for pair in refs for r in pair if r() is not None] == []


class RecordingBackend(_backend.Backend):
    """A backend object written against the contract, run through the public API."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def check_platform(self, what: str) -> None:
        self.calls.append(f"check {what}")

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> object:
        self.calls.append(f"prepare {name}")
        return (func, args)

    def start(self, run: Run, job: Any) -> FakeWork:
        func, args = job
        self.calls.append("start")
        run.report(Ending.ENDED, (True, func(*args)))
        return FakeWork()

    def default_limit(self) -> int:
        return 3


@pytest.mark.anyio
async def test_backend_object_through_the_public_api() -> None:
    """run_killable(), spawn() and default_limiter() accept any Backend object, and call
    it in the contract's order: check, prepare, start."""
    backend = RecordingBackend()
    assert await tb.run_killable(divmod, 7, 2, backend=backend) == (3, 1)
    assert await tb.spawn(abs, -4, backend=backend) == 4
    assert backend.calls == [
        *("check run_killable()", "prepare divmod", "start"),
        *("check spawn()", "prepare abs", "start"),
    ]
    assert tb.default_limiter(backend).total_tokens == 3
    assert tb.default_limiter(backend).borrowed_tokens == 0


@pytest.mark.anyio
async def test_backend_that_fails_to_start_gives_the_token_back() -> None:
    """An exception from start() reaches the caller, and the limiter token goes back."""

    class Broken(RecordingBackend):
        def start(self, run: Run, job: Any) -> FakeWork:
            raise OSError("no room")

    backend = Broken()
    limiter = anyio.CapacityLimiter(1)
    with pytest.raises(OSError, match="no room"):
        await tb.run_killable(abs, 1, backend=backend, limiter=limiter)
    assert limiter.borrowed_tokens == 0
