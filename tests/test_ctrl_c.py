"""Ctrl-C as a person presses it, in a real program on each loop: the first climbs the
ladder, a second one while it climbs skips the rest of the graces."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from .helpers import IGNORES_ITS_TOKEN, CtrlCProgram

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")

PROGRAM = (
    """
import json, signal, sys, threading, time
# As typed in a terminal: a suite run as a background job hands its children SIGINT
# ignored, and Python keeps it so.
signal.signal(signal.SIGINT, signal.default_int_handler)
import anyio
import threadbridge as tb

POLICY = tb.Policy(grace=60, interrupt_grace=60)

"""
    + IGNORES_ITS_TOKEN
    + """


async def main(how, backend):
    call = lambda: tb.run_killable(ignores_its_token, policy=POLICY, backend=backend)
    if how == "nursery":
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
    elif how == "deadline":
        # The deadline is set once the target runs (a loaded machine may take longer
        # than any fixed one to start it; then there is no ladder to hurry).
        started = threading.Event()

        def target():
            started.set()
            ignores_its_token()

        async def deadline_once_started(scope):
            await anyio.to_thread.run_sync(started.wait)
            scope.deadline = anyio.current_time() + 0.1

        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:
                tg.start_soon(deadline_once_started, scope)
                await tb.run_killable(target, policy=POLICY, backend=backend)
        print("the program went on, uninterrupted", flush=True)
    else:
        await call()


def ending(exc):  # what ended the run: KeyboardInterrupt (alone or in groups), or another
    inner = getattr(exc, "exceptions", None)
    if inner is not None and {ending(e) for e in inner} == {"KeyboardInterrupt"}:
        return "KeyboardInterrupt"
    return type(exc).__name__


if __name__ == "__main__":
    loop, how, backend = sys.argv[1:4]
    try:
        anyio.run(main, how, backend, backend=loop)
        ended = "returned"
    except BaseException as exc:
        ended = ending(exc)
    stages = {s.name: n for s, n in tb.stats().stages.items() if n}
    print(json.dumps([ended, stages, time.monotonic()]), flush=True)
"""
)

# anyio.run() on asyncio before Python 3.11 (its own copy of asyncio.Runner) ends with
# CancelledError where 3.11+ raise KeyboardInterrupt: its tasks cannot say whether
# they were cancelled by a Ctrl-C (no Task.uncancel()), with or without threadbridge.
OLD_ASYNCIO = sys.version_info < (3, 11)


def _interrupted(loop: str) -> str:
    return "CancelledError" if loop == "asyncio" and OLD_ASYNCIO else "KeyboardInterrupt"


def _ctrl_c(tmp_path: Path, *args: str, presses: int) -> tuple[list[str], str, float]:
    """Run the program; press Ctrl-C once the target runs (unless ``presses`` is 1: a
    deadline's ladder starts it), and again once its token is set. Its stdout lines,
    its stderr, and when the last Ctrl-C was sent."""
    program = CtrlCProgram(tmp_path, PROGRAM, *args)
    program.expect("started")
    if presses == 2:
        program.press_ctrl_c()
    program.expect("token set")  # rung 1: the ladder climbs
    last = time.monotonic()
    program.press_ctrl_c()
    lines, err = program.end()
    return lines, err, last


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("where", ["main task", "nursery"])
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_second_ctrl_c_ends_the_wait_at_once(
    tmp_path: Path, loop: str, where: str, backend: str
) -> None:
    """The first Ctrl-C sets the target's token (rung 1) and the program waits for the
    graces (a minute each here); a second one skips them: rung 3 at once (the thread
    abandoned, the worker killed), then KeyboardInterrupt ends the program as usual."""
    lines, err, second = _ctrl_c(tmp_path, loop, where.split()[0], backend, presses=2)
    ending, stages, ended = json.loads(lines[-1])
    assert ending == _interrupted(loop), err
    assert stages == {"ABANDONED" if backend == "thread" else "KILLED": 1}, err
    assert ended - second < 30  # not the two minutes of graces
    assert "Ctrl-C while it was being stopped" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_ctrl_c_during_a_deadlines_ladder_hurries_it_and_interrupts(
    tmp_path: Path, loop: str
) -> None:
    """A Ctrl-C while the ladder of a deadline climbs: the rest of the graces are skipped,
    and the program is interrupted as by any Ctrl-C (it does not go on after the wait)."""
    lines, err, _ = _ctrl_c(tmp_path, loop, "deadline", "thread", presses=1)
    ending, stages, _ = json.loads(lines[-1])
    assert stages == {"ABANDONED": 1}, err
    if loop == "asyncio" and OLD_ASYNCIO:
        # There, anyio's cancel scope cannot tell the Ctrl-C's cancel from its own
        # deadline's, and takes it as its own: the program goes on (as it does
        # without threadbridge).
        assert (lines[0], ending) == ("the program went on, uninterrupted", "returned")
    else:
        assert (len(lines), ending) == (1, "KeyboardInterrupt"), err
    assert "Ctrl-C while it was being stopped" in err


ELSEWHERE = """
import signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as typed in a terminal
import anyio
import threadbridge as tb


def main_thread_asleep():
    # Whether the main thread waits in its loop's select() (asyncio's selector, trio's
    # epoll wait).
    frame = sys._current_frames().get(threading.main_thread().ident)
    return frame is not None and frame.f_code.co_name in ("select", "get_events")


def target():
    print("started", flush=True)
    while not main_thread_asleep():
        time.sleep(0.001)
    # The kernel may hand a Ctrl-C to any thread: here it goes to this pool thread, so
    # that only the C handler runs at once, and the main thread's loop sleeps on.
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    tb.current_token().wait()  # rung 1, from the Ctrl-C's ladder
    print("token set", flush=True)


async def main():
    await tb.run_killable(target)


try:
    anyio.run(main, backend=sys.argv[1])
except BaseException as exc:
    print(type(exc).__name__, flush=True)
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_ctrl_c_that_another_thread_takes_still_reaches_the_program(
    tmp_path: Path, loop: str
) -> None:
    """A Ctrl-C handled by a pool thread's C signal handler wakes the idle loop, whose
    thread runs the Python handler: the ladder climbs (asyncio's loop wakes on a signal
    only where a wakeup fd is set, which threadbridge does while it awaits)."""
    program = CtrlCProgram(tmp_path, ELSEWHERE, loop)
    program.expect("started")
    program.expect("token set")
    lines, err = program.end()
    assert lines == [_interrupted(loop)], (program.process.returncode, err)
