"""Ctrl-C as a person presses it, in a real program on each loop: the first climbs the
ladder, a second one while it climbs skips the rest of the graces."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")

PROGRAM = """
import json, signal, sys, time
# As typed in a terminal: a suite run as a background job hands its children SIGINT
# ignored, and Python keeps it so.
signal.signal(signal.SIGINT, signal.default_int_handler)
import anyio
import threadbridge as tb

POLICY = tb.Policy(grace=60, interrupt_grace=60)


def ignores_its_token():
    print("started", flush=True)
    said = False
    while True:
        time.sleep(0.01)
        if tb.cancel_requested() and not said:
            said = True
            print("token set", flush=True)


async def main(how, backend):
    call = lambda: tb.run_killable(ignores_its_token, policy=POLICY, backend=backend)
    if how == "nursery":
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
    elif how == "deadline":
        with anyio.move_on_after(0.1):
            await call()
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
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    process = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    stdout = process.stdout
    assert stdout is not None

    def expect(line: str) -> None:
        # Bounded: a program stuck on its way there shows every thread's stack (SIGABRT
        # makes faulthandler print them) instead of hanging the suite.
        timer = threading.Timer(60, process.send_signal, (signal.SIGABRT,))
        timer.start()
        try:
            got = stdout.readline().strip()
        finally:
            timer.cancel()
        if got != line:
            process.kill()
            raise AssertionError(f"expected {line!r}, got {got!r}:\n{process.communicate()[1]}")

    try:
        expect("started")
        if presses == 2:
            process.send_signal(signal.SIGINT)
        expect("token set")  # rung 1: the ladder climbs
        last = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return out.splitlines(), err, last


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
