"""Property-based tests: random policies, behaviours and cancel timings keep the
invariants. The await returns within the policy's bound, ``handle.stage`` agrees with
what the target did, and nothing is left running."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import threadbridge as tb
from threadbridge import testing

from . import targets
from .helpers import spin_forever

pytestmark = pytest.mark.anyio

HUGE = 1e9  # a grace that never runs out within a test
MARGIN = 3.0  # generous: scheduling on a loaded 2-core machine


@dataclass
class Marks:
    """What a thread target reports about itself."""

    started: threading.Event
    early: threading.Event  # rung 2 landed before a blocking target was blocked in C


def thread_target(
    i: int, behaviour: str, amount: float, release: threading.Event, marks: Marks
) -> tuple[str, int]:
    marks.started.set()
    if behaviour == "spin":  # pure Python, never checks: rung 2 stops it
        spin_forever()
    if behaviour == "block":  # blocked in C: only rung 3 ends the wait for it
        try:
            release.wait()
        except tb.TargetCancelled:
            marks.early.set()
            raise
        return ("ok", i)
    if behaviour == "swallow":
        try:
            spin_forever()
        except tb.TargetCancelled:
            release.wait()
        return ("ok", i)
    return targets.stress_target(i, behaviour, amount)


@dataclass
class Case:
    behaviour: str
    amount: float
    policy: tb.Policy
    delay: float


small = st.sampled_from([0.0, 0.001, 0.01, 0.05])


@st.composite
def cases(draw: st.DrawFn, behaviours: list[str]) -> Case:
    behaviour = draw(st.sampled_from(behaviours))
    amount = draw(st.sampled_from([0.0, 0.001, 0.01]))
    ends_itself = behaviour in ("return", "raise", "check", "tb_sleep")
    if ends_itself:  # any grace, even one that never runs out
        grace = draw(st.one_of(small, st.just(HUGE)))
        interrupt_grace = draw(st.one_of(small, st.just(HUGE)))
        interrupt = draw(st.booleans())
    elif behaviour == "spin":  # rung 2 must come, soon
        grace, interrupt, interrupt_grace = draw(small), True, draw(st.one_of(small, st.just(HUGE)))
    elif behaviour == "swallow":  # rung 2 is what it swallows; rung 3 must come soon
        grace, interrupt, interrupt_grace = draw(small), True, draw(small)
    else:  # blocked in C: rung 3 must come, soon
        grace, interrupt, interrupt_grace = draw(small), draw(st.booleans()), draw(small)
    policy = tb.Policy(grace=grace, interrupt=interrupt, interrupt_grace=interrupt_grace)
    delay = draw(st.sampled_from([0.0, 0.0005, 0.005, 0.05]))
    return Case(behaviour, amount, policy, delay)


def bound(case: Case) -> float:
    """How long the cancelled await may take, at most."""
    p = case.policy
    if case.behaviour in ("return", "raise", "check", "tb_sleep"):
        return case.delay + case.amount + MARGIN
    if case.behaviour == "spin":
        return case.delay + p.grace + MARGIN
    return case.delay + p.grace + p.interrupt_grace + MARGIN


def expected_stages(case: Case, backend: str, rung2: bool, rung3: bool) -> set[tb.Stage]:
    """The exact oracle for a cancelled call: the stage follows from what the ladder did
    to the target (its own records: rung 2 said only once it reached the running target,
    rung 3 only once it gave up on a target still running) and from the target's shape.

    * rung 3 given up on it: ABANDONED (a thread) or KILLED (a process);
    * else rung 2 reached it: INTERRUPTED (a target that swallows rung 2 is never ended
      by it: only rung 3 ends it);
    * else, a target that ends by itself: FINISHED if it ended before the cancel came,
      COOPERATIVE if after; one that never ends by itself was stopped before it started:
      COOPERATIVE.
    """
    if rung3:
        return {tb.Stage.ABANDONED if backend == "thread" else tb.Stage.KILLED}
    ends_itself = case.behaviour in ("return", "raise", "check", "tb_sleep")
    if rung2:
        if case.behaviour == "swallow":
            return set()  # it swallows rung 2: only rung 3 may end it
        stages = {tb.Stage.INTERRUPTED}
        if backend == "process":
            # A worker's rung 2 is said once the worker has the job, which may not have
            # started there yet: the stop set before it starts keeps it from starting.
            stages.add(tb.Stage.COOPERATIVE)
        return stages
    if ends_itself:
        return {tb.Stage.FINISHED, tb.Stage.COOPERATIVE}
    return {tb.Stage.COOPERATIVE}


class LadderRecords(logging.Handler):
    """What the ladder said of the rungs it climbed, during one example."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.rung2 = False
        self.rung3 = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "interrupting it (rung 2)" in message:
            self.rung2 = True
        if "(rung 3)" in message and ("abandoning" in message or "killed" in message):
            self.rung3 = True


async def run_case(case: Case, backend: str) -> None:
    # Each example has its own release event, set whatever happens: a thread left
    # waiting by one example must never wait on into the next.
    release = threading.Event()
    marks = Marks(threading.Event(), threading.Event())
    records = LadderRecords()
    logger = logging.getLogger("threadbridge")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    try:
        if backend == "thread":
            args: tuple[object, ...] = (7, case.behaviour, case.amount, release, marks)
            handle = tb.spawn(thread_target, *args, policy=case.policy)  # type: ignore[arg-type]
        else:
            handle = tb.spawn(
                targets.stress_target,
                7,
                case.behaviour,
                case.amount,
                policy=case.policy,
                backend="process",
            )
        t0 = time.monotonic()
        with anyio.move_on_after(case.delay) as scope:
            try:
                result = await handle
            except targets.CustomError:
                result = ("ok", 7)
        elapsed = time.monotonic() - t0
        release.set()
        assert elapsed <= bound(case), (elapsed, case)
        assert handle.done()
        if not scope.cancelled_caught:
            assert result == ("ok", 7)
            assert handle.stage is tb.Stage.FINISHED
        else:
            expected = expected_stages(case, backend, records.rung2, records.rung3)
            assert handle.stage in expected, (handle.stage, expected, case)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
        release.set()
        # Nothing keeps running: abandoned threads end once released.
        await testing.wait_all_ended(timeout=10)


PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@PROPERTY_SETTINGS
@given(case=cases(["return", "raise", "check", "tb_sleep", "spin", "block", "swallow"]))
async def test_thread_invariants(case: Case) -> None:
    """Threads: bounded await, a stage that fits the behaviour, no leak."""
    await run_case(case, "thread")


@settings(PROPERTY_SETTINGS, max_examples=25)
@given(case=cases(["return", "raise", "check", "tb_sleep"]))
async def test_process_invariants(case: Case) -> None:
    """Worker processes: the same invariants for targets that end by themselves."""
    await run_case(case, "process")
