"""Ctrl-C as a person presses it, in a real program on each loop: the first climbs the
ladder, a second one while it climbs skips the rest of the graces."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
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


def ignores_its_token():
    print("started", flush=True)
    said = False
    while True:
        time.sleep(0.01)
        if tb.cancel_requested() and not said:
            said = True
            print("token set", flush=True)


async def main(where, backend):
    policy = tb.Policy(grace=60, interrupt_grace=60)
    call = lambda: tb.run_killable(ignores_its_token, policy=policy, backend=backend)
    if where == "nursery":
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
    else:
        await call()


def how(exc):  # what ended the run: KeyboardInterrupt (alone or in groups), or another
    inner = getattr(exc, "exceptions", None)
    if inner is not None and {how(e) for e in inner} == {"KeyboardInterrupt"}:
        return "KeyboardInterrupt"
    return type(exc).__name__


if __name__ == "__main__":
    loop, where, backend = sys.argv[1:4]
    try:
        anyio.run(main, where, backend, backend=loop)
        ended = "returned"
    except BaseException as exc:
        ended = how(exc)
    stages = {s.name: n for s, n in tb.stats().stages.items() if n}
    print(json.dumps([ended, stages, time.monotonic()]), flush=True)
"""

# anyio.run() on asyncio before Python 3.11 (its own copy of asyncio.Runner) ends with
# CancelledError where 3.11+ raise KeyboardInterrupt: its tasks cannot say whether
# they were cancelled by a Ctrl-C (no Task.uncancel()), with or without threadbridge.
OLD_ASYNCIO = sys.version_info < (3, 11)


def _interrupted(loop: str) -> str:
    return "CancelledError" if loop == "asyncio" and OLD_ASYNCIO else "KeyboardInterrupt"


def _next_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("where", ["main task", "nursery"])
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_second_ctrl_c_ends_the_wait_at_once(
    tmp_path: Path, loop: str, where: str, backend: str
) -> None:
    """The first Ctrl-C sets the target's token (rung 1) and the program waits for the
    graces (a minute each here); a second one skips them: rung 3 at once (the thread
    abandoned, the worker killed), then KeyboardInterrupt ends the program as usual."""
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    process = subprocess.Popen(
        [sys.executable, str(script), loop, where.split()[0], backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert _next_line(process) == "started"
        process.send_signal(signal.SIGINT)
        assert _next_line(process) == "token set"  # rung 1: the ladder climbs
        second = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    ending, stages, ended = json.loads(out)
    assert ending == _interrupted(loop), err
    assert stages == {"ABANDONED" if backend == "thread" else "KILLED": 1}, err
    assert ended - second < 30  # not the two minutes of graces
    assert "Ctrl-C while it was being stopped" in err
    assert "Traceback" not in err


DEADLINE = """
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import anyio
import threadbridge as tb


def ignores_its_token():
    print("started", flush=True)
    said = False
    while True:
        time.sleep(0.01)
        if tb.cancel_requested() and not said:
            said = True
            print("token set", flush=True)


async def main():
    with anyio.move_on_after(0.1):
        await tb.run_killable(ignores_its_token, policy=tb.Policy(grace=60, interrupt_grace=60))
    print("the program went on, uninterrupted", flush=True)


if __name__ == "__main__":
    try:
        anyio.run(main, backend=sys.argv[1])
        ended = "returned"
    except BaseException as exc:
        ended = type(exc).__name__
    stages = {s.name: n for s, n in tb.stats().stages.items() if n}
    print(json.dumps([ended, stages]), flush=True)
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_ctrl_c_during_a_deadlines_ladder_hurries_it_and_interrupts(
    tmp_path: Path, loop: str
) -> None:
    """A Ctrl-C while the ladder of a deadline climbs: the rest of the graces are skipped,
    and the program is interrupted as by any Ctrl-C (it does not go on after the wait)."""
    script = tmp_path / "deadline.py"
    script.write_text(DEADLINE)
    process = subprocess.Popen(
        [sys.executable, str(script), loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert _next_line(process) == "started"
        assert _next_line(process) == "token set"  # the deadline's ladder climbs
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    lines = out.splitlines()
    ending, stages = json.loads(lines[-1])
    assert stages == {"ABANDONED": 1}, err
    if loop == "asyncio" and OLD_ASYNCIO:
        # There, anyio's cancel scope cannot tell the Ctrl-C's cancel from its own
        # deadline's, and takes it as its own: the program goes on (as it does
        # without threadbridge).
        assert (lines[0], ending) == ("the program went on, uninterrupted", "returned")
    else:
        assert (lines, ending) == (lines[-1:], "KeyboardInterrupt"), err
    assert "Ctrl-C while it was being stopped" in err
