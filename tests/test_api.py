"""The public names, and clear errors for every bad input."""

from __future__ import annotations

import functools
import inspect
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadbridge as tb


def test_all_names_exist_and_are_public() -> None:
    """__all__, the lazy-import map and the names re-exported for type checkers list the
    same names, and each of them loads from the module the map names."""
    import ast
    import importlib

    source = Path(inspect.getfile(tb)).read_text()
    typed = {
        alias.asname
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname and not alias.asname.startswith("_")
    }
    where: dict[str, str] = tb._WHERE
    assert set(tb.__all__) == set(where) == typed
    for name, module in where.items():
        loaded = importlib.import_module(f"threadbridge.{module}")
        assert getattr(tb, name) is (loaded if module == name else getattr(loaded, name))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grace": -1}, "grace"),
        ({"grace": math.nan}, "grace"),
        ({"interrupt_grace": -0.5}, "interrupt_grace"),
        ({"interrupt_grace": math.nan}, "interrupt_grace"),
    ],
)
def test_policy_rejects_bad_graces(kwargs: dict[str, float], message: str) -> None:
    """Negative or NaN graces are a ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        tb.Policy(**kwargs)  # type: ignore[arg-type]


def test_policy_rejects_wrong_types() -> None:
    """Non-numbers and non-bools are a TypeError."""
    with pytest.raises(TypeError, match="grace"):
        tb.Policy(grace="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="grace"):
        tb.Policy(grace=True)
    with pytest.raises(TypeError, match="force"):
        tb.Policy(force=1)  # type: ignore[arg-type]


def test_policy_is_frozen_and_accepts_zero_and_inf() -> None:
    """Policy is immutable; zero and infinite graces are allowed."""
    p = tb.Policy(grace=0, interrupt_grace=math.inf)
    with pytest.raises(AttributeError):
        p.grace = 3  # type: ignore[misc]
    assert tb.Policy() == tb.Policy(grace=1.0, interrupt=True, interrupt_grace=1.0, force=True)


def test_spawn_outside_event_loop_says_what_to_do() -> None:
    """spawn() from sync code is a RuntimeError that names asyncio.run/trio.run."""
    with pytest.raises(RuntimeError, match=r"asyncio\.run|trio\.run"):
        tb.spawn(print)


def test_run_killable_outside_event_loop() -> None:
    """run_killable() driven outside a loop gives the same clear RuntimeError."""
    coro = tb.run_killable(print)
    with pytest.raises(RuntimeError, match="event loop"):
        coro.send(None)
    coro.close()


@pytest.mark.anyio
async def test_async_function_is_type_error() -> None:
    """An async function is refused before anything runs."""

    async def job() -> None:
        pass  # pragma: no cover

    with pytest.raises(TypeError, match="async function"):
        tb.spawn(job)
    with pytest.raises(TypeError, match="async function"):
        _ = await tb.run_killable(functools.partial(job))


@pytest.mark.anyio
async def test_coroutine_object_is_closed_without_warning() -> None:
    """A coroutine object is refused and closed, so no 'never awaited' warning leaks."""

    async def job() -> None:
        pass  # pragma: no cover

    coro = job()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="coroutine"):
            tb.spawn(coro)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


@pytest.mark.anyio
async def test_sync_function_returning_coroutine_is_type_error() -> None:
    """A sync callable that returns a coroutine: TypeError, and the coroutine is closed."""

    async def job() -> None:
        pass  # pragma: no cover

    def returns_coroutine() -> Coroutine[Any, Any, None]:
        return job()

    with pytest.raises(TypeError, match="returned a coroutine"):
        _ = await tb.run_killable(returns_coroutine)


@pytest.mark.anyio
async def test_non_callable_is_type_error() -> None:
    """A non-callable is a TypeError naming what was given."""
    with pytest.raises(TypeError, match="callable"):
        tb.spawn(42)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_bad_options_are_clear() -> None:
    """Unknown backends, policies and limiters are refused with a message."""
    with pytest.raises(ValueError, match="backend"):
        await tb.run_killable(print, backend="fork")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Policy"):
        tb.spawn(print, policy={"grace": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CapacityLimiter"):
        tb.spawn(print, limiter=3)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_keyword_arguments_through_partial() -> None:
    """Keyword arguments reach the target through functools.partial."""
    assert await tb.run_killable(functools.partial(int, base=16), "ff") == 255


@pytest.mark.anyio
async def test_handle_repr_and_name() -> None:
    """A handle names its target."""

    def my_target() -> int:
        return 1

    handle = tb.spawn(my_target)
    assert "my_target" in handle.name
    assert await handle == 1
    assert "FINISHED" in repr(handle)


@pytest.mark.anyio
async def test_default_limiter_is_per_loop_and_40() -> None:
    """The default thread limiter has 40 tokens and is reused within a loop."""
    lim = tb.default_limiter()
    assert lim.total_tokens == 40
    assert tb.default_limiter("thread") is lim


def test_errors_carry_their_data() -> None:
    """WorkerCrashed and RemoteError keep what they describe."""
    crashed = tb.WorkerCrashed("worker died", exitcode=3)
    assert crashed.exitcode == 3
    assert crashed.signal is None
    remote = tb.RemoteError("mod.Err", "bad thing", "Traceback ...")
    assert remote.type_name == "mod.Err"
    assert "bad thing" in str(remote)
    assert "Traceback" in str(remote)
    assert issubclass(tb.TargetCancelled, BaseException)
    assert not issubclass(tb.TargetCancelled, Exception)


@pytest.mark.anyio
async def test_await_in_another_loop_is_refused() -> None:
    """A handle awaited from a different event loop gives a clear RuntimeError."""
    handle = tb.spawn(threading.get_ident)
    await handle

    async def other() -> None:
        with pytest.raises(RuntimeError, match="another event loop"):
            await handle

    await anyio.to_thread.run_sync(lambda: anyio.run(other))


def test_errors_pickle_round_trip() -> None:
    """WorkerCrashed and RemoteError survive pickling with their data."""
    import pickle

    crashed = pickle.loads(pickle.dumps(tb.WorkerCrashed("died", signal=9)))
    assert (str(crashed), crashed.exitcode, crashed.signal) == ("died", None, 9)
    remote = pickle.loads(pickle.dumps(tb.RemoteError("m.E", "msg", "tb")))
    assert (remote.type_name, remote.message, remote.traceback_text) == ("m.E", "msg", "tb")


def test_public_names_report_threadbridge_as_their_module() -> None:
    """Classes and functions say `threadbridge`, not the private module defining them;
    they still pickle by reference."""
    import pickle

    for name in tb.__all__:
        value = getattr(tb, name)
        if not inspect.ismodule(value):
            assert value.__module__ == "threadbridge", name
    assert repr(tb.TargetCancelled).startswith("<class 'threadbridge.TargetCancelled'")
    assert pickle.loads(pickle.dumps(tb.Stage.KILLED)) is tb.Stage.KILLED
    crashed = pickle.loads(pickle.dumps(tb.WorkerCrashed("gone", signal=9, pid=12)))
    assert (crashed.signal, crashed.pid) == (9, 12)


@pytest.mark.anyio
async def test_unknown_backend_name_in_default_limiter() -> None:
    """A misspelt backend is an error listing the names, never a new limiter."""
    with pytest.raises(ValueError, match='"thread", "process"'):
        tb.default_limiter("proces")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_sleep_in_the_event_loop_thread_is_refused() -> None:
    """threadbridge.sleep() on a loop's own thread raises at once instead of blocking it."""
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"await anyio\.sleep"):
        tb.sleep(0.5)
    assert time.monotonic() - t0 < 0.4


def test_sleep_outside_any_loop_is_time_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside targets and loops, threadbridge.sleep() is plain time.sleep(): it calls it
    once, with the same length."""
    calls: list[float] = []
    monkeypatch.setattr(time, "sleep", calls.append)
    tb.sleep(0.25)
    tb.sleep(0)
    assert calls == [0.25, 0]


def test_stop_from_another_loop_is_a_clear_error() -> None:
    """Handle.stop(), like awaiting the handle, from another event loop or another trio
    run raises a clear RuntimeError instead of crashing or hanging either loop."""
    release = threading.Event()
    results: list[str] = []

    async def spawn_in_first() -> tb.Handle[bool]:
        return tb.spawn(release.wait)

    async def use_in_second(handle: tb.Handle[bool], how: str) -> None:
        try:
            if how == "stop":
                await handle.stop()
            else:
                await handle
        except RuntimeError as exc:
            results.append(str(exc))

    for first, second in (("asyncio", "trio"), ("trio", "asyncio"), ("trio", "trio")):
        for how in ("stop", "await"):
            release.clear()
            handle = anyio.run(spawn_in_first, backend=first)
            anyio.run(use_in_second, handle, how, backend=second)
            release.set()
    assert len(results) == 6
    assert all("belongs to another event loop" in r for r in results)


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_ray_backend_without_ray_names_the_extra(loop: str) -> None:
    """Without Ray, import threadbridge never imports it, and backend="ray" is an
    ImportError that names the extra to install."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        import anyio, threadbridge as tb
        async def main():
            assert await tb.run_killable(int, "7") == 7
            assert sys.modules.copy().get("ray") is None  # never imported
            try:
                await tb.run_killable(int, backend="ray")
            except ImportError as exc:
                print(exc)
        anyio.run(main, backend={loop!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        'threadbridge.ray needs Ray: install it with pip install "threadbridge[ray]"'
    )


WITHOUT_POSIX_SIGNALS = """
import json, sys, time

# What Windows' signal, os and select modules lack, taken away once the event loops (which
# need them on Linux) are loaded: threadbridge must import whole, run threads, and refuse
# its process and Ray backends clearly.
import asyncio, anyio, trio, subprocess, socket, selectors
import anyio._backends._asyncio, anyio._backends._trio
try:
    import ray  # and what it imports (uvloop, where installed)
except ImportError:
    pass
import _signal, os, select, signal

for name in ["SIGPIPE", "SIGCHLD", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
             "SIGALRM", "pthread_sigmask", "pthread_kill", "sigwait", "sigtimedwait",
             "siginterrupt", "setitimer", "alarm"]:
    for module in (signal, _signal):
        if hasattr(module, name):
            delattr(module, name)
for name in ["fork", "killpg", "getpgrp", "setsid", "pidfd_open", "register_at_fork", "waitid"]:
    if hasattr(os, name):
        delattr(os, name)
if hasattr(select, "poll"):
    delattr(select, "poll")

import threadbridge as tb
from threadbridge import *  # every public name loads
import threadbridge.testing


import threading

started = threading.Event()


def spin():
    started.set()
    while True:
        pass


async def main():
    out = {}
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    handle = tb.spawn(spin, policy=policy)
    while not started.is_set():
        await anyio.sleep(0.01)
    out["thread"] = (await handle.stop()).value
    for backend in ("process", "ray"):
        try:
            await tb.run_killable(time.sleep, 0, backend=backend)
        except NotImplementedError as exc:
            out[backend] = str(exc)
    try:
        async with tb.ProcessPool(1):
            pass
    except NotImplementedError as exc:
        out["ProcessPool"] = str(exc)
    threadbridge.testing.check_leaks()
    print(json.dumps(out))


if sys.argv[1] == "demo":
    import runpy

    sys.argv[1:] = ["demo"]
    runpy.run_module("threadbridge", run_name="__main__")
else:
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_platform_without_posix_signals(tmp_path: Path, loop: str) -> None:
    """Where the signal module has no SIGPIPE, SIGKILL or pthread_sigmask and os has no
    fork or killpg (Windows), threadbridge imports whole, the thread backend climbs its
    ladder, and the process and Ray backends refuse with a clear error."""
    script = tmp_path / "without_posix_signals.py"
    script.write_text(WITHOUT_POSIX_SIGNALS)
    done = subprocess.run(
        [sys.executable, str(script), loop], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["thread"] == "interrupted"
    assert 'use backend="thread" there' in out["process"]
    assert 'use backend="thread" there' in out["ProcessPool"]
    assert "run the driver and the cluster on Linux or macOS" in out["ray"]


def test_the_demo_without_posix_signals(tmp_path: Path) -> None:
    """Where worker processes are unavailable (Windows), the demo shows the thread rows on
    both loops and says why there are no process rows, instead of failing on them."""
    script = tmp_path / "without_posix_signals.py"
    script.write_text(WITHOUT_POSIX_SIGNALS)
    done = subprocess.run(
        [sys.executable, str(script), "demo"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no worker processes" in done.stdout
    assert "/proc" not in done.stdout
    assert done.stdout.count("INTERRUPTED") == 2  # the pure-Python loop, on each loop
