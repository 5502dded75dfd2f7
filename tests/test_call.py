"""threadbridge.call() and @killable: a deadline for a blocking call in plain code. The
value, or CallTimeout once the target has stopped; Ctrl-C climbs the ladder first."""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadbridge as tb

from . import targets
from .helpers import IGNORES_ITS_TOKEN, CtrlCProgram, lines_soon, spin_forever, spin_until

FAST = tb.Policy(grace=0.05, interrupt_grace=0.5)  # for work that only rung 3 ends
# Rung 2 soon, and all the time it needs to land (rung 3 only if it cannot): a loaded
# 2-core machine running six suites at once may not schedule a spinning thread for a while.
INTERRUPT = tb.Policy(grace=0.05, interrupt_grace=30)
DEADLINE = 2.0


def test_the_value_and_the_exception_come_back() -> None:
    assert tb.call(targets.add, 1, 2) == 3
    assert tb.call(functools.partial(targets.add, b=5), 1, timeout=30) == 6
    with pytest.raises(targets.CustomError, match="boom"):
        tb.call(targets.raise_custom, "boom", timeout=30)
    assert tb.call(targets.add, 2, 2, backend="process", timeout=30) == 4


def _spin(path: str) -> None:
    targets.spin_marked(path)


def _long_c_call(path: str) -> None:
    targets.mark(path, "started")
    targets.long_c_call(10**11)


# What the ladder does to each kind of blocking work, on each backend.
KINDS = [
    ("thread", targets.cooperative, tb.Stage.COOPERATIVE),  # checks its token
    ("thread", _spin, tb.Stage.INTERRUPTED),  # pure Python: rung 2 lands
    ("thread", functools.partial(targets.sleep_marked, seconds=5), tb.Stage.ABANDONED),
    ("process", targets.cooperative, tb.Stage.COOPERATIVE),
    ("process", _spin, tb.Stage.INTERRUPTED),
    ("process", functools.partial(targets.sleep_marked, seconds=60), tb.Stage.INTERRUPTED),
    ("process", _long_c_call, tb.Stage.KILLED),  # one C call: only SIGKILL ends it
    ("process", targets.ignore_term_marked, tb.Stage.KILLED),
]


@pytest.mark.parametrize(
    ("backend", "target", "stage"), KINDS, ids=[f"{b}-{s.name.lower()}" for b, _, s in KINDS]
)
def test_a_deadline_stops_every_kind_of_work(
    tmp_path: Path, backend: str, target: object, stage: tb.Stage
) -> None:
    # A target that checks its token gets all the time it needs to see it (a loaded
    # machine may take more than FAST's 50 ms to wake it), rung 2 all it needs to land;
    # what only rung 3 ends gets FAST.
    policy = {
        tb.Stage.COOPERATIVE: tb.Policy(grace=30, interrupt_grace=0.5),
        tb.Stage.INTERRUPTED: INTERRUPT,
    }.get(stage, FAST)
    log = tmp_path / "log"
    # A warm worker, and a deadline well past the time it takes to start the target on
    # it (on a loaded machine too): the target is running when the deadline comes.
    assert tb.call(targets.add, 1, 1, backend=backend) == 2  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(tb.CallTimeout) as info:
        tb.call(target, str(log), timeout=DEADLINE, backend=backend, policy=policy)  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert lines_soon(log, 1, timeout=0)[0] == "started"  # it ran, and was stopped
    assert info.value.stage is stage
    assert f"it was stopped ({stage.value})" in str(info.value)
    assert took < DEADLINE + FAST.grace + FAST.interrupt_grace + 10  # COOPERATIVE: at once
    if stage is tb.Stage.INTERRUPTED:
        assert isinstance(info.value.__cause__, tb.TargetCancelled)
    # Where it was as rung 2 (or, for a thread, rung 3) fired: the target's own frame. A
    # worker killed at rung 3 may have had no chance to say it (one C call holds the
    # GIL): not asserted there.
    if stage is tb.Stage.COOPERATIVE:
        assert info.value.stopped_at is None
    elif stage is not tb.Stage.KILLED:
        inner = "spin_marked" if target is _spin else "sleep_marked"
        assert info.value.stopped_at is not None
        assert f"in {inner}\n" in info.value.stopped_at
        assert "it was at targets.py:" in str(info.value)


def test_a_zero_timeout_stops_at_once() -> None:
    with pytest.raises(tb.CallTimeout) as info:
        tb.call(spin_forever, timeout=0, policy=INTERRUPT)
    assert info.value.stage in (tb.Stage.COOPERATIVE, tb.Stage.INTERRUPTED)


def test_bad_input_is_a_clear_error_at_the_call() -> None:
    async def coroutine_function() -> None:
        pass

    for timeout in (-1, math.nan, True, "1"):
        with pytest.raises(ValueError, match="timeout must be seconds >= 0"):
            tb.call(targets.add, 1, 2, timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be seconds >= 0"):
            tb.killable(timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async function"):
        tb.call(coroutine_function)  # type: ignore[unused-coroutine]
    with pytest.raises(TypeError, match="async function"):
        tb.killable(coroutine_function)
    with pytest.raises(TypeError, match="expected a callable"):
        tb.call(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        tb.call(targets.add, 1, 2, backend="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy must be"):
        tb.call(targets.add, 1, 2, policy="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="make an Executor of it"):
        tb.call(targets.add, 1, 2, backend=tb.ProcessPool(1))
    with pytest.raises(TypeError, match="cannot be pickled"):
        tb.call(targets.add, threading.Lock(), 1, backend="process")  # type: ignore[arg-type]
    assert tb.call(targets.add, 1, 2, backend="process") == 3  # nothing was lost


def test_many_threads_at_once() -> None:
    results: dict[int, object] = {}

    def caller(i: int) -> None:
        if i % 2:
            results[i] = tb.call(targets.add, i, i, timeout=30)
        else:
            try:
                tb.call(spin_forever, timeout=0.05, policy=INTERRUPT)
            except tb.CallTimeout as exc:
                results[i] = exc.stage

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # A deadline that comes before its target starts stops it there (COOPERATIVE).
    stopped = {tb.Stage.INTERRUPTED, tb.Stage.COOPERATIVE}
    assert sorted(results) == list(range(16))
    for i, result in results.items():
        assert (result == 2 * i) if i % 2 else (result in stopped), (i, result)


@pytest.mark.anyio
async def test_inside_a_target_the_inner_call_stops_with_it() -> None:
    """call() inside a target that is being stopped: the inner call is stopped first,
    then the target gets TargetCancelled."""
    inner_runs = threading.Event()
    stages: list[int] = []

    def inner() -> None:
        inner_runs.set()
        spin_forever()

    def outer() -> None:
        try:
            tb.call(inner, policy=INTERRUPT)
        finally:
            stages.append(tb.stats().stages[tb.Stage.INTERRUPTED])

    before = tb.stats().stages[tb.Stage.INTERRUPTED]
    handle = tb.spawn(outer, policy=tb.Policy(grace=60, interrupt_grace=60))
    await anyio.to_thread.run_sync(inner_runs.wait)
    handle.cancel()
    with pytest.raises(tb.TargetCancelled, match="waiting for call"):
        await handle
    assert handle.stage is tb.Stage.COOPERATIVE  # it ended at rung 1, by raising
    assert stages == [before + 1]  # the inner call had stopped (by rung 2) before it


def test_a_call_inside_a_call() -> None:
    started = threading.Event()

    def spin() -> None:
        started.set()
        spin_forever()

    def outer() -> str:
        try:
            tb.call(spin, timeout=0.5, policy=INTERRUPT)
        except tb.CallTimeout as exc:
            return exc.stage.name
        return "no timeout"

    stage = tb.call(outer, timeout=30)
    # Stopped before it started if a loaded machine let the deadline pass first.
    assert stage == ("INTERRUPTED" if started.is_set() else "COOPERATIVE")


def test_killable_decorates_with_and_without_arguments() -> None:
    @tb.killable
    def plain(a: int) -> int:
        """Doubles."""
        return 2 * a

    started = threading.Event()

    @tb.killable(timeout=0.5, policy=INTERRUPT)
    def endless(a: int) -> None:
        started.set()
        while True:
            a += 1

    assert plain(4) == 8
    assert (plain.__name__, plain.__doc__) == ("plain", "Doubles.")
    with pytest.raises(tb.CallTimeout) as info:
        endless(1)
    # A loaded machine (3.13t in CI) once let the deadline pass before a pool thread
    # took the call up: then it never runs, and was stopped at rung 1.
    due = tb.Stage.INTERRUPTED if started.is_set() else tb.Stage.COOPERATIVE
    assert info.value.stage is due


def test_a_killable_process_function_runs_in_a_worker_of_the_caller() -> None:
    """Pickled to the worker, the decorated function runs there itself: not through
    another call() (which would start a worker of the worker)."""
    assert targets.killable_parent() == os.getpid()


PROGRAM = (
    """
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as typed in a terminal
import threadbridge as tb

"""
    + IGNORES_ITS_TOKEN
    + """


if __name__ == "__main__":
    backend, presses = sys.argv[1], int(sys.argv[2])
    grace = 60 if presses == 2 else 0.05
    try:
        policy = tb.Policy(grace=grace, interrupt_grace=60)
        tb.call(ignores_its_token, backend=backend, policy=policy)
        ended = "returned"
    except KeyboardInterrupt:
        ended = "KeyboardInterrupt"
    stages = {s.name: n for s, n in tb.stats().stages.items() if n}
    print(json.dumps([ended, stages]), flush=True)
"""
)


def ctrl_c_after_the_first_cancel(future: tb.Future[Any]) -> list[bool]:
    """Make ``future.cancel()`` raise KeyboardInterrupt once, after it has done its
    part: where a second Ctrl-C lands in the main thread as the first one's cancel
    returns. The list says whether it has."""
    real_cancel = future.cancel
    pressed: list[bool] = []

    def cancel_then_ctrl_c() -> bool:
        cancelled = real_cancel()
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt
        return cancelled

    future.cancel = cancel_then_ctrl_c  # type: ignore[method-assign]
    return pressed


def test_a_ctrl_c_as_the_call_is_being_cancelled_still_waits_for_its_stop() -> None:
    """A second Ctrl-C that lands while the first one's cancel is under way (rung 1
    sent, the wait not begun yet) skips the graces and waits for the stop, as one that
    lands in the wait does (it escaped: the call was left climbing its graces)."""
    from threadbridge import _plain

    started, flag = threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        spin_until(flag)

    with tb.Executor(policy=tb.Policy(grace=60, interrupt_grace=60)) as ex:
        future = ex.submit(work)
        assert started.wait(30)
        pressed = ctrl_c_after_the_first_cancel(future)
        try:
            _plain.stop(future)
        except KeyboardInterrupt:  # pragma: no cover - what the defect did
            pytest.fail("the Ctrl-C escaped the wait for the stop")
        finally:
            flag.set()
        assert (pressed, future.stage) == ([True], tb.Stage.ABANDONED)


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
@pytest.mark.parametrize("presses", [1, 2])
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_ctrl_c_climbs_the_ladder_then_interrupts(
    tmp_path: Path, backend: str, presses: int
) -> None:
    """Ctrl-C while call() waits: the target climbs the ladder (a second Ctrl-C skips the
    graces: rung 3 at once), and only then does KeyboardInterrupt propagate."""
    program = CtrlCProgram(tmp_path, PROGRAM, backend, str(presses))
    program.expect("started")
    program.press_ctrl_c()
    if presses == 2:
        program.expect("token set")  # it waits for the graces
        program.press_ctrl_c()
    lines, err = program.end()
    ended, stages = json.loads(lines[-1])
    rung3 = "ABANDONED" if backend == "thread" else "KILLED"
    expected = "INTERRUPTED" if presses == 1 else rung3
    assert (ended, stages) == ("KeyboardInterrupt", {expected: 1}), err


def test_a_ctrl_c_as_a_process_call_is_being_cancelled_still_waits_for_its_stop(
    tmp_path: Path,
) -> None:
    """The same for a call on a worker process (its engine runs an event loop): a second
    Ctrl-C landing as the first one's cancel returns, before the wait for the stop has
    begun, skips the graces and waits (it escaped call(): the program printed its
    KeyboardInterrupt with the call still climbing a 60 s grace, and hung at its exit)."""
    log = tmp_path / "log"
    with tb.Executor("process", policy=tb.Policy(grace=60, interrupt_grace=60)) as ex:
        future = ex.submit(targets.spin_marked, str(log))
        lines_soon(log, 1)
        pressed = ctrl_c_after_the_first_cancel(future)
        try:
            ex._core.interrupted(future)  # what call() runs on the first Ctrl-C
        except KeyboardInterrupt:  # pragma: no cover - what the defect did
            pytest.fail("the Ctrl-C escaped the wait for the stop")
        assert pressed == [True]
        assert future.wait_stopped(0)
        assert future.stage is tb.Stage.KILLED  # hurried: rung 3 at once
