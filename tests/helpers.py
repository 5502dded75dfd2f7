"""Gates between test code in the event loop and targets in other threads."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import sys
import threading
import time
import types
from collections.abc import Collection, Iterator
from types import CodeType
from typing import Any

import anyio
import pytest

import threadbridge as tb
from threadbridge import TargetCancelled, _locks, uninterruptible
from threadbridge._loop import Link, current_link


class Signal:
    """Set from any thread; awaited in the event loop that created it."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._link = current_link("Signal()")
        self.flag = threading.Event()

    def set(self) -> None:
        # Called from targets: rung 2 must not tear it half-way (the loop would never
        # hear of it). Held off, the interrupt fires when the block exits, so a target
        # that wants to catch TargetCancelled calls set() inside its try block.
        with uninterruptible():
            if not self.flag.is_set():
                self.flag.set()
                self._link.post(self._event.set)

    def is_set(self) -> bool:
        return self.flag.is_set()

    async def wait(self) -> None:
        await self._event.wait()


class RungWatcher(logging.Handler):
    """Sets a threading.Event when the ladder logs rung 2 or rung 3 for a target.
    ``messages``: the ladder's records from INFO up (rung 1 and a stop's end are DEBUG)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rung2 = threading.Event()
        self.rung3 = threading.Event()
        self.messages: list[str] = []
        self._link: Link | None = None
        self.rung2_seen: anyio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if "rung 2" in message:
            self.rung2.set()
            if self._link is not None and self.rung2_seen is not None:
                self._link.post(self.rung2_seen.set)
        if "rung 3" in message:
            self.rung3.set()

    async def wait_rung2(self) -> None:
        """Wait in the event loop until rung 2 has been logged."""
        assert self.rung2_seen is not None, "enter the watcher inside the event loop"
        with anyio.fail_after(10):
            await self.rung2_seen.wait()

    def __enter__(self) -> RungWatcher:
        try:
            self._link = current_link("RungWatcher")
            self.rung2_seen = anyio.Event()
        except RuntimeError:
            self._link = None  # used outside an event loop
        logger = logging.getLogger("threadbridge")
        self._old_level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("threadbridge")
        logger.removeHandler(self)
        logger.setLevel(self._old_level)


def spin_forever() -> None:
    """A pure-Python loop that never checks its token: only rung 2 or 3 stops it."""
    while True:
        pass


def spin_until(flag: threading.Event) -> None:
    """A pure-Python loop that ignores its token until ``flag`` is set."""
    while not flag.is_set():
        pass


def block_in_c(started: Signal, release: threading.Event) -> None:
    """Announce the start, then block inside a C call until ``release`` is set.

    An interrupt can only land between bytecodes, so it never reaches the thread while
    it waits; one that lands before the wait begins (while announcing) is swallowed here
    so that the target does reach its C call, as the tests that use it intend.
    """
    try:
        started.set()
    except TargetCancelled:
        pass
    release.wait()


# The waits of threading's Condition (Event.wait() too) and of threadbridge's own (a
# threadbridge.Future's result()).
_WAIT_CODES = (threading.Condition.wait.__code__, _locks.Condition.wait.__code__)


async def until_blocked_in_wait(thread: threading.Thread) -> None:
    """Wait until ``thread`` is blocked inside the C call of a wait (an ``Event.wait()``,
    a ``Condition.wait()``, a future's ``result()``): see ``until_parked``."""
    await until_parked(thread, _WAIT_CODES)


async def until_parked(thread: threading.Thread, codes: Collection[CodeType]) -> None:
    """Wait until ``thread``'s innermost Python frame runs one of ``codes`` and the
    thread sleeps in the kernel (Linux: its system call is futex; elsewhere the frame
    alone is checked): it is blocked in a C call of that code (a lock, a wait)."""
    assert thread.ident is not None
    assert thread.native_id is not None
    syscall = f"/proc/self/task/{thread.native_id}/syscall"
    futex = {"x86_64": "202", "aarch64": "98"}.get(platform.machine())
    with anyio.fail_after(10):
        while True:
            frame = sys._current_frames().get(thread.ident)
            if frame is not None and frame.f_code in codes:
                if futex is None:
                    return  # not a machine whose futex number is known: the frame it is
                try:
                    with open(syscall) as f:  # noqa: ASYNC230 - a /proc read does not block
                        number = f.read().split()[0]
                except OSError:
                    return  # no /proc: the frame is all there is to go by
                if number == futex:  # parked in the lock's wait
                    return
            await anyio.sleep(0.001)


async def until_running(thread_id: int, code: CodeType, line: int) -> None:
    """Wait until the thread ``thread_id`` runs ``code`` at or past its ``line``-th line.

    ``line`` counts from the ``def`` line (0).
    For tests that need rung 2 to land inside a particular loop: the target cannot
    announce that it has entered the loop without leaving it.
    """
    with anyio.fail_after(10):
        while True:
            frame = sys._current_frames().get(thread_id)
            while frame is not None:
                if frame.f_code is code and frame.f_lineno >= code.co_firstlineno + line:
                    return
                frame = frame.f_back
            await anyio.sleep(0.001)


def traced_call_returns() -> bool:
    """Call a function under sys.settrace in a fresh thread; whether it returned.

    On CPython 3.11 such a call spins forever at its first instruction while the
    interpreter's shared "asynchronous exception pending" flag is left set.
    """
    done = threading.Event()

    def tracer(frame: object, event: str, arg: object) -> object:
        return tracer

    def noop() -> None:
        pass

    def traced() -> None:
        sys.settrace(tracer)  # type: ignore[arg-type]
        try:
            noop()
        finally:
            sys.settrace(None)
        done.set()

    threading.Thread(target=traced, name="traced-call", daemon=True).start()
    return done.wait(10)


def join_soon_started(thread: threading.Thread, timeout: float = 30) -> None:
    """Join a thread, for at most ``timeout`` seconds. threading.enumerate() lists a
    thread from the moment start() is called, a moment before join() accepts it ("cannot
    join thread before it is started"): such a thread is waited for, not failed on."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            thread.join(max(0.0, deadline - time.monotonic()))
            return
        except RuntimeError:  # listed, but not started yet: it will be in a moment
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)


async def wait_for_pool_threads() -> None:
    """Wait until threadbridge's reaper and standby-starter threads have finished."""
    for thread in threading.enumerate():
        if thread.name in ("threadbridge-reap", "threadbridge-standby"):
            await anyio.to_thread.run_sync(join_soon_started, thread)


# The loops of the modules most sensitive to how a loop delivers cancellation, watches
# descriptors and ends: asyncio, trio, and asyncio on uvloop (libuv underneath, Cython
# tasks and handles), which many asyncio services run.
UVLOOP = pytest.param(
    ("asyncio", {"use_uvloop": True}),
    id="uvloop",
    marks=pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows"),
)
ALL_LOOPS = ["asyncio", "trio", UVLOOP]


class QuietRun:
    """Just enough of a Run for ThreadBackend.start(), for tests of the pool itself: it
    adds how each run ended to ``ends``, and releases ``reported`` once for each."""

    def __init__(self, ends: list[object], reported: threading.Semaphore | None = None) -> None:
        self.name = "abs()"
        self.link = types.SimpleNamespace(portal=None)  # no event loop for from_thread
        self.attached = False
        self.span = None  # not traced
        self.ends = ends
        self.reported = reported

    def attach(self, work: object) -> None:
        self.attached = True

    def report(self, ending: object, outcome: object = None, **_: object) -> None:
        self.ends.append(ending)
        if self.reported is not None:
            self.reported.release()

    def hand_back(self, **_: object) -> None:
        pass

    def release(self) -> None:
        pass


def pool_threads_cannot_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting a pool thread fail as it does when the system is out of threads;
    other threads start as usual. Undone with the monkeypatch."""
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "threadbridge-worker":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)


def worker_of(handle: Any) -> Any:
    """The worker process (threadbridge's ``WorkerProcess``) that runs a process call.

    A named reach-in to threadbridge's internals, the only one of its kind: for the
    fault-injection tests that break the parent's own end of a worker (close its pipes
    under it), which nothing public can reach."""
    from threadbridge._worker_process import WorkerProcess

    work = handle._run._work
    assert work is not None, "the call has not started in a worker (or has ended)"
    worker = work.worker
    assert isinstance(worker, WorkerProcess)
    return worker


def lines_soon(path: Any, count: int, timeout: float = 30) -> list[str]:
    """The first ``count`` lines a target (in a thread or a worker) has written to
    ``path``, for plain (not async) tests; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            lines: list[str] = path.read_text().splitlines()
            if len(lines) >= count:
                return lines
        assert time.monotonic() < deadline, f"{path} has not got {count} lines in {timeout}s"
        time.sleep(0.005)


# The target of the Ctrl-C programs (tests that press Ctrl-C in a real program): it
# says when it runs and when its token is set, and otherwise ignores it.
IGNORES_ITS_TOKEN = """
def ignores_its_token():
    print("started", flush=True)
    said = False
    while True:
        time.sleep(0.01)
        if tb.cancel_requested() and not said:
            said = True
            print("token set", flush=True)
"""


@contextlib.contextmanager
def executor_loop_held(executor: Any) -> Iterator[None]:
    """Keep a process Executor's own event loop busy for the block: what is submitted
    meanwhile waits on its way to the loop. (A reach-in, as worker_of(): the loop is the
    executor's private.)"""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait()

    executor._core.thread.link.post(hold)
    assert held.wait(30)
    try:
        yield
    finally:
        release.set()


class CtrlCProgram:
    """A program run as from a terminal, for tests that press Ctrl-C in it: read its
    lines as it prints them (bounded: a program stuck on its way shows every thread's
    stack instead of hanging the suite), press Ctrl-C, then collect its end.

    Its stdout is read through one reader only (the lines ``expect()`` reads may bring
    more with them, which ``end()`` must see too); its stderr is read by a thread from
    the start, so that the program never blocks on a full pipe."""

    def __init__(self, tmp_path: Any, source: str, *args: str) -> None:
        import subprocess

        script = tmp_path / "program.py"
        script.write_text(source)
        self.process = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", str(script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        self._err: list[str] = []
        stderr = self.process.stderr
        assert stderr is not None
        self._err_reader = threading.Thread(target=lambda: self._err.append(stderr.read()))
        self._err_reader.start()

    def _stderr(self) -> str:
        """All of its stderr, once it has exited; its pipes closed."""
        self._err_reader.join(30)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return "".join(self._err)

    def expect(self, line: str) -> None:
        import signal

        process, stdout = self.process, self.process.stdout
        assert stdout is not None
        # SIGABRT makes faulthandler print every thread's stack.
        timer = threading.Timer(60, process.send_signal, (signal.SIGABRT,))
        timer.start()
        try:
            got = stdout.readline().strip()
        finally:
            timer.cancel()
        if got != line:
            process.kill()
            process.wait()
            raise AssertionError(f"expected {line!r}, got {got!r}:\n{self._stderr()}")

    def press_ctrl_c(self) -> None:
        import signal

        self.process.send_signal(signal.SIGINT)

    def end(self) -> tuple[list[str], str]:
        """Its remaining stdout lines and its stderr, once it has exited (it is killed if
        it has not within a minute)."""
        import signal
        import subprocess

        process, stdout = self.process, self.process.stdout
        assert stdout is not None
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # SIGABRT makes faulthandler print every thread's stack: where it hung.
            process.send_signal(signal.SIGABRT)
            try:
                process.wait(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            stuck = self._stderr()
            raise AssertionError(f"the program did not end within 60 s:\n{stuck}") from None
        lines = stdout.read().splitlines()
        return lines, self._stderr()


class Blocked:
    """A thread target that blocks in a C call (a lock's wait) until ``release`` is set:
    rung 2 cannot land there, so the ladder abandons it (rung 3)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        self.release.wait()

    async def abandoned(self) -> tb.Handle[None]:
        """Spawn it, let it block, stop it: abandoned (release it afterwards)."""
        handle = tb.spawn(self, policy=tb.Policy(grace=0, interrupt_grace=0))
        await anyio.to_thread.run_sync(self.entered.wait)
        try:
            assert await handle.stop() is tb.Stage.ABANDONED
        except BaseException:
            self.release.set()
            raise
        return handle


def forked_child_exit_code(pid: int, what: str, timeout: float = 60) -> int:
    """The exit code of the forked child ``pid``; killed, and an AssertionError naming
    ``what``, if it has not exited within ``timeout`` seconds."""
    statuses: list[int] = []
    reaper = threading.Thread(target=lambda: statuses.append(os.waitpid(pid, 0)[1]))
    reaper.start()
    reaper.join(timeout)
    if not statuses:
        os.kill(pid, signal.SIGKILL)
        reaper.join(30)
        raise AssertionError(f"the forked child hung ({what})")
    return os.waitstatus_to_exitcode(statuses[0])
