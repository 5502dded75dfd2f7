"""On a free-threaded build (3.13t and later): threadbridge keeps the GIL off.

CPython turns the GIL back on, for the whole process, when it imports an extension module
that does not declare itself free-threading safe. Nothing threadbridge imports (in the
parent, in its threads, in a worker process) may do so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

# While a thread imports an extension module, CPython may turn the GIL on for the time of
# the import (once, in 3.13t, a pool thread was told it was on while the program itself,
# a moment later, was told it was off). What is checked is that nothing turns it on for
# good: the pool thread is asked after the first thread call and the process call, once
# the program's imports are done (ctypes, which threadbridge loads on its scheduler
# thread as the first pool thread starts, is loaded up front).
PROGRAM = textwrap.dedent(
    """
    import ctypes
    import sys
    import anyio
    import threadbridge as tb

    async def main():
        await tb.run_killable(sys._is_gil_enabled)
        there = await tb.run_killable(sys._is_gil_enabled, backend="process")
        here = await tb.run_killable(sys._is_gil_enabled)
        print(sys._is_gil_enabled(), here, there)

    anyio.run(main, backend=sys.argv[1])
    """
)


@pytest.mark.skipif(not FREE_THREADED, reason="about free-threaded builds")
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_the_gil_stays_off(loop: str) -> None:
    """With the GIL left to its default (PYTHON_GIL unset), a program that imports
    threadbridge and runs a thread call and a process call has no GIL, in the parent
    and in the worker process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", PROGRAM, loop],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "False"], done.stderr
