"""Process targets as users write them: functions, lambdas and closures of their own script,
of ``python -m module``, and of ``-c`` code; each run as a real program on both loops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import threadbridge as tb
from threadbridge import _jobs, _spawn

from . import targets

LOOPS = ["asyncio", "trio"]

SCRIPT = """
import json, sys, traceback
import multiprocessing  # its import names __main__ "__mp_main__" too, in the worker as well
import anyio
import threadbridge as tb
from threadbridge import _jobs, _spawn

BIG = bytes(8_000_000)  # module data: the worker's import of this script has it too


def uses_big():
    return len(BIG)


def make_closures():
    base = 100

    def add(x, y=1, *, z=2):
        return base + x + y + z

    def countdown(n):
        return 0 if n == 0 else 1 + countdown(n - 1)  # itself, through its closure

    def late():
        return later  # a cell filled after this function was made

    later = "filled"
    add.tag = "attribute"
    return add, countdown, late


def where_it_fails():
    return (lambda: 1 / 0)()


async def main():
    out = {}
    run = tb.run_killable
    out["uses_big"] = await run(uses_big, backend="process")
    out["uses_big_payload"] = len(_jobs.dumps_job(uses_big, (), "uses_big"))
    out["lambda_big"] = await run(lambda: len(BIG) + 1, backend="process")
    out["lambda_big_payload"] = len(_jobs.dumps_job(lambda: len(BIG), (), "lambda"))
    out["guarded"] = await run(lambda: GUARDED, backend="process")
    add, countdown, late = make_closures()
    out["closure"] = await run(add, 1, backend="process")
    out["countdown"] = await run(countdown, 5, backend="process")
    out["late"] = await run(late, backend="process")
    out["attribute"] = await run(lambda: add.tag, backend="process")
    try:
        await run(where_it_fails, backend="process")
    except ZeroDivisionError as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        out["frames"] = [(f.filename, f.lineno, f.name) for f in frames[-2:]]
    out["cloudpickle_imported"] = "cloudpickle" in sys.modules
    print(json.dumps(out))


if __name__ == "__main__":
    GUARDED = "set by the guarded block"
    print("guarded block ran", file=sys.stderr)
    anyio.run(main, backend=sys.argv[1])
"""


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def _line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.mark.parametrize("loop", LOOPS)
def test_script_targets(tmp_path: Path, loop: str) -> None:
    """The script's functions travel by reference and its data stays in the worker; the
    worker imports the script as __mp_main__ (its guarded block does not run there); lambdas
    and closures travel as code, with their real file and line, and see the script's
    globals, what only the guarded block set included; cloudpickle is never imported."""
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    done = _run([str(script), loop], tmp_path)
    out = json.loads(done.stdout)
    assert done.stderr.count("guarded block ran") == 1
    assert out["uses_big"] == 8_000_000
    assert out["uses_big_payload"] < 200  # a reference, not 8 MB
    assert out["lambda_big"] == 8_000_001
    assert out["lambda_big_payload"] < 1000  # its code; BIG is the worker's own
    assert out["guarded"] == "set by the guarded block"
    assert out["closure"] == 100 + 1 + 1 + 2
    assert out["countdown"] == 5
    assert out["late"] == "filled"
    assert out["attribute"] == "attribute"
    lambda_line = _line_of(SCRIPT, "return (lambda: 1 / 0)()")
    assert out["frames"] == [
        [str(script), lambda_line, "where_it_fails"],
        [str(script), lambda_line, "<lambda>"],
    ]
    assert out["cloudpickle_imported"] is False


@pytest.mark.parametrize("loop", LOOPS)
def test_module_run_with_dash_m(tmp_path: Path, loop: str) -> None:
    """``python -m module``: the worker imports the module by name as __mp_main__."""
    (tmp_path / "user_module.py").write_text(SCRIPT)
    done = _run(["-m", "user_module", loop], tmp_path)
    out = json.loads(done.stdout)
    assert done.stderr.count("guarded block ran") == 1
    assert out["uses_big_payload"] < 200
    assert out["guarded"] == "set by the guarded block"


DASH_C = """
import json, sys, anyio, threadbridge as tb

def square(x):
    return x * x

FACTOR = 3

async def main():
    out = [
        await tb.run_killable(square, 4, backend="process"),
        await tb.run_killable(lambda: FACTOR * 2, backend="process"),
    ]
    try:
        await tb.run_killable(lambda: 1 / 0, backend="process")
    except ZeroDivisionError as exc:
        import traceback
        out.append(traceback.extract_tb(exc.__traceback__)[-1].filename)
    print(json.dumps(out))

anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_dash_c_code_travels_by_value(tmp_path: Path, loop: str) -> None:
    """Code no worker can import (``-c``) travels by value, its globals with it."""
    done = _run(["-c", DASH_C, loop], tmp_path)
    assert json.loads(done.stdout) == [16, 6, "<string>"]


UNGUARDED = """
import sys, anyio, threadbridge as tb

def double(x):
    return 2 * x

async def main():
    try:
        print(await tb.run_killable(double, 21, backend="process"))
    except Exception as exc:
        # One write: this script runs in the parent and in workers, all on one pipe.
        sys.stdout.write(f"{type(exc).__name__} {exc}\\n")
        sys.stdout.flush()

anyio.run(main, backend=sys.argv[1])  # no __main__ guard
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_unguarded_script_is_a_clear_error(tmp_path: Path, loop: str) -> None:
    """A script that starts process work when imported: the worker's import of it (which
    runs the script's code, as multiprocessing's spawn does) is refused more workers with
    an error that says what to do; nothing recurses, and the parent's call still works."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    done = _run([str(script), loop], tmp_path)
    lines = done.stdout.splitlines()
    assert set(lines) == {
        "42",  # the parent's own call
        # printed by the script as each worker (the first, and its standby) imported it:
        "RuntimeError run_killable(): this is a worker process importing the main script "
        "(as __mp_main__, so that the functions defined in it can run in workers), and the "
        "script started process work while being imported. Put the script's entry point "
        'under `if __name__ == "__main__":`',
    }


@pytest.mark.anyio
async def test_module_targets_travel_by_reference() -> None:
    """A function of an importable module travels as its module and name."""
    payload = _jobs.dumps_job(targets.add, (1, 2), "add")
    assert len(payload) < 100
    assert b"tests.targets" in payload
    assert await tb.run_killable(targets.add, 1, 2, backend="process") == 3


WARM = """
import json, sys, time, anyio, threadbridge as tb

async def main():
    import colorsys  # here, not at the top: the worker's import of this script skips it

    await tb.run_killable(colorsys.rgb_to_hsv, 1, 0, 0, backend="process")
    busy = tb.spawn(time.sleep, 60, backend="process")  # takes the only worker...
    with anyio.fail_after(60):  # ...so a standby is started beside it
        while tb.stats().idle_workers < 1:
            await anyio.sleep(0.01)
    probe = lambda: sorted(m for m in ("colorsys", "tblib") if m in sys.modules)
    seen = await tb.run_killable(probe, backend="process")  # the standby
    await busy.stop()
    print(json.dumps(seen))

if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_standby_imports_what_jobs_needed(tmp_path: Path, loop: str) -> None:
    """A standby worker imports, while it idles, the modules earlier jobs needed and what
    an exception needs on its way back: the call that takes it does not wait for them."""
    script = tmp_path / "warm.py"
    script.write_text(WARM)
    done = _run([str(script), loop], tmp_path)
    assert json.loads(done.stdout) == ["colorsys", "tblib"]


@pytest.mark.anyio
async def test_code_no_worker_can_import_keeps_its_file_and_line(tmp_path: Path) -> None:
    """A function of a module no worker can import travels by value (cloudpickle), with
    its real file name and line numbers."""
    source = "def fails(x):\n    y = x + 1\n    raise ValueError(y)\n"
    path = tmp_path / "made_at_run_time.py"
    path.write_text(source)
    namespace: dict[str, object] = {"__name__": "made_at_run_time"}  # not in sys.modules
    exec(compile(source, str(path), "exec"), namespace)
    with pytest.raises(ValueError, match="42") as info:
        await tb.run_killable(namespace["fails"], 41, backend="process")  # type: ignore[arg-type]
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (last.filename, last.lineno, last.name) == (str(path), 3, "fails")


@pytest.mark.parametrize("loop", LOOPS)
def test_a_launcher_without_py_ending_is_not_imported_by_workers(tmp_path: Path, loop: str) -> None:
    """A console-script launcher (as pytest's) is not imported into workers; its own
    functions still run (by value)."""
    launcher = tmp_path / "launcher"  # no .py: like the pytest or uvicorn command
    launcher.write_text(
        "import sys, anyio, threadbridge as tb\n"
        "print('launcher imported', file=sys.stderr)\n"
        "def triple(x):\n    return 3 * x\n"
        "async def main():\n"
        "    print(await tb.run_killable(triple, 5, backend='process'))\n"
        "if __name__ == '__main__':\n    anyio.run(main, backend=sys.argv[1])\n"
    )
    done = _run([str(launcher), loop], tmp_path)
    assert done.stdout.strip() == "15"
    assert done.stderr.count("launcher imported") == 1  # the parent only


MAIN_CLASSES = """
import collections, dataclasses, json, sys
import anyio
import threadbridge as tb


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


Pair = collections.namedtuple("Pair", "left right")


class ScriptError(Exception):
    pass


def make():
    return Point(1, 2), Pair("a", "b")


def fails():
    raise ScriptError("raised in the worker")


async def main():
    point, pair = await tb.run_killable(make, backend="process")
    try:
        await tb.run_killable(fails, backend="process")
    except ScriptError as exc:
        caught = str(exc)
    print(json.dumps({
        "point": [type(point) is Point, point.x, point.y],
        "pair": [type(pair) is Pair, *pair],
        "caught": caught,
        "multiprocessing": "multiprocessing" in sys.modules,
    }))


if __name__ == "__main__":
    tb.set_start_method(sys.argv[2])
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("how", ["script", "module"])
@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", LOOPS)
def test_objects_of_main_script_classes_come_back(
    tmp_path: Path, loop: str, method: str, how: str
) -> None:
    """A dataclass or namedtuple of the main script that a target returns, and an
    exception class of it that a target raises, arrive as the parent's own classes (a
    worker knows them as __mp_main__'s), in a program that never imports multiprocessing."""
    (tmp_path / "classes.py").write_text(MAIN_CLASSES)
    main = ["classes.py"] if how == "script" else ["-m", "classes"]
    done = _run([*main, loop, method], tmp_path)
    assert json.loads(done.stdout) == {
        "point": [True, 1, 2],
        "pair": [True, "a", "b"],
        "caught": "raised in the worker",
        "multiprocessing": False,
    }


BOOT_FROM_PARENT = """
import json, os, sys
import anyio
import threadbridge as tb


def where():
    import tblib
    return [tb.__file__, tblib.__file__, os.getcwd()]


async def main():
    # A tool's folder on PYTHONPATH, set for a subprocess: workers inherit the variable.
    os.environ["PYTHONPATH"] = sys.argv[3]
    print(json.dumps([await tb.run_killable(where, backend="process"), where()]))


if __name__ == "__main__":
    tb.set_start_method(sys.argv[2])
    anyio.run(main, backend=sys.argv[1])
"""

# What a stranger's folder holds: imported by a worker, each says so and breaks it.
_IMPOSTOR = "open({marker!r}, 'a').write({name!r} + ' ran\\n')\nraise SystemExit(1)\n"


@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", LOOPS)
def test_workers_boot_from_where_the_parent_imported_threadbridge(
    tmp_path: Path, loop: str, method: str
) -> None:
    """A threadbridge, tblib or stdlib-named package in the working directory, or in a
    folder the program put on PYTHONPATH, is never imported by a worker's boot: workers
    run the parent's threadbridge, and no code of those folders runs in them."""
    marker = tmp_path / "imported.txt"
    for folder in ("cwd", "tool"):
        for name in ("threadbridge", "tblib", "cloudpickle", "org", "struct", "signal"):
            package = tmp_path / folder / name
            package.mkdir(parents=True)
            (package / "__init__.py").write_text(
                _IMPOSTOR.format(marker=str(marker), name=f"{folder}/{name}")
            )
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "boot.py").write_text(BOOT_FROM_PARENT)
    done = _run(
        [str(tmp_path / "app" / "boot.py"), loop, method, str(tmp_path / "tool")],
        tmp_path / "cwd",
    )
    assert not marker.exists(), marker.read_text()
    in_worker, in_parent = json.loads(done.stdout)
    assert in_worker == in_parent
    assert in_parent[0] == tb.__file__


SAME_GLOBALS = """
import json, os, sys
import anyio
import threadbridge as tb

LIMIT = 2  # the script's import binds it; its guarded block changes it


def by_reference():
    return LIMIT


async def main():
    global GUARDED
    seen = []
    # A fresh worker for every call: the first was started before any worker had said
    # which names its import of the script binds, the others after.
    async with tb.ProcessPool(workers=1, max_tasks_per_worker=1) as fresh:
        for value in ("first", "second", "third"):
            GUARDED = value
            seen.append(await tb.run_killable(lambda: (LIMIT, GUARDED), backend=fresh))
            seen.append([await tb.run_killable(by_reference, backend=fresh), value])
    async with tb.ProcessPool(workers=1) as reused:  # one worker, call after call
        for value in ("fourth", "fifth"):
            GUARDED = value
            seen.append(await tb.run_killable(lambda: (LIMIT, GUARDED), backend=reused))
    print(json.dumps(seen))


if __name__ == "__main__":
    LIMIT = 10
    GUARDED = None
    tb.set_start_method(sys.argv[2])
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", LOOPS)
def test_a_lambda_sees_the_same_globals_in_every_worker(
    tmp_path: Path, loop: str, method: str
) -> None:
    """A lambda of the main script sees the same globals in every worker, whichever
    worker runs it and whenever it started: a name the script's import binds has the
    value that import gives it, as for a function that travels by reference (spawn and
    forkserver workers import the script; a forked worker has the parent's own values);
    a name only the guarded block binds travels with each call, as it is then."""
    (tmp_path / "same_globals.py").write_text(SAME_GLOBALS)
    done = _run(["same_globals.py", loop, method], tmp_path)
    limit = 10 if method == "fork" else 2
    assert json.loads(done.stdout) == [
        [limit, "first"],
        [limit, "first"],
        [limit, "second"],
        [limit, "second"],
        [limit, "third"],
        [limit, "third"],
        [limit, "fourth"],
        [limit, "fifth"],
    ]


SLOW_IMPORT = """
import json, os, sys, time

if __name__ == "__mp_main__":
    # The fork server's import of this script: it takes until the parent opens the gate
    # (or 20 s, when it opens the gate itself).
    gate = os.environ["GATE"]
    deadline = time.monotonic() + 20
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    open(gate, "a").close()

import anyio
import threadbridge as tb


def square(x):
    return x * x


async def main():
    gate = os.environ["GATE"]
    with anyio.move_on_after(0.5) as scope:
        await tb.run_killable(square, 3, backend="process")
    spawned = tb.spawn(square, 5, backend="process")
    stage = await spawned.stop()
    gate_was_open = os.path.exists(gate)
    open(gate, "a").close()
    with anyio.fail_after(60):
        result = await tb.run_killable(square, 4, backend="process")
    print(json.dumps([scope.cancelled_caught, stage.name, gate_was_open, result]))


if __name__ == "__main__":
    tb.set_start_method("forkserver")
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.skipif("forkserver" not in _spawn.START_METHODS, reason="no forkserver here")
@pytest.mark.parametrize("loop", LOOPS)
def test_a_fork_server_importing_the_script_never_blocks_the_loop(
    tmp_path: Path, loop: str
) -> None:
    """While the fork server imports the main script (which may take long, or never end),
    the loop runs on: a call waiting for it is cancelled by its deadline like any other
    wait (and a spawned one stopped before it started), and calls run once it is ready."""
    script = tmp_path / "slow_import.py"
    script.write_text(SLOW_IMPORT)
    done = subprocess.run(
        [sys.executable, str(script), loop],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GATE": str(tmp_path / "gate")},
    )
    assert done.returncode == 0, done.stderr
    # The deadline and the stop came while the server still imported the script.
    assert json.loads(done.stdout) == [True, "COOPERATIVE", False, 16]
