"""Gates between test code in the event loop and targets in other threads."""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import CodeType

import anyio
import pytest

from threadbridge import TargetCancelled, uninterruptible
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
    """Sets a threading.Event when the ladder logs rung 2 or rung 3 for a target."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
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
        self.link = None
        self.attached = False
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
