"""Targets for worker processes: a light module (stdlib and threadbridge only), so that a
worker importing it starts fast."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import threadbridge as tb


def add(a: int, b: int) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def pgid() -> tuple[int, int]:
    return os.getpid(), os.getpgrp()


class CustomError(Exception):
    pass


def raise_custom(message: str) -> None:
    raise CustomError(message)


class Unpicklable(Exception):
    """An exception that cannot travel back: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        import threading

        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise Unpicklable("holds a lock")


def _refuse_to_load() -> None:
    raise RuntimeError("this exception cannot be rebuilt")


class Unloadable(Exception):
    """Pickles, but cannot be unpickled."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse_to_load, ())


def raise_unloadable() -> None:
    raise Unloadable("cannot be rebuilt")


def return_unpicklable() -> object:
    import threading

    return threading.Lock()


def exit_with(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def mark(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


def write_pid_then_sleep(path: str, seconds: float) -> None:
    mark(path, str(os.getpid()))
    time.sleep(seconds)


def cooperative(path: str) -> str:
    mark(path, "started")
    try:
        tb.current_token().wait()
        mark(path, f"token {tb.cancel_requested()}")
        tb.check_cancelled()
        return "unreachable"
    finally:
        mark(path, "finally")


def tb_sleeper(path: str) -> None:
    mark(path, "started")
    try:
        tb.sleep(60)
    except tb.TargetCancelled:
        mark(path, "woke")
        raise


class _SleepsInDel:
    """Its __del__ blocks in time.sleep: a rung 2 sent then fires inside it, where CPython
    drops exceptions (it reports them as "Exception ignored in" and goes on)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __del__(self) -> None:
        mark(self.path, "in __del__")
        time.sleep(60)


def rung2_lands_in_del(path: str) -> None:
    _SleepsInDel(path)  # dropped at once: its __del__ runs here
    blocking_sleeper(path)


def blocking_sleeper(path: str) -> None:
    """Blocks in time.sleep (C); rung 2's SIGTERM interrupts it. "started" is written
    inside the try: a rung 2 sent as soon as it shows may land before the sleep."""
    try:
        mark(path, "started")
        with open(path + ".with", "w") as f:
            f.write("open")
            time.sleep(60)
    except tb.TargetCancelled:
        mark(path, "TargetCancelled")
        raise
    finally:
        mark(path, "finally")


def uninterruptible_then_sleep(path: str, hold: float) -> None:
    mark(path, "started")
    try:
        with tb.uninterruptible():
            mark(path, "in block")
            time.sleep(hold)  # SIGTERM arrives here, and waits
            mark(path, "block done")
        mark(path, "after block")
    except tb.TargetCancelled:
        mark(path, "TargetCancelled")
        raise


def ignores_sigterm_with_grandchild(path: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    mark(path, f"{os.getpid()} {child.pid}")
    while True:
        time.sleep(60)


def swallows(path: str) -> None:
    mark(path, "started")
    try:
        time.sleep(60)
    except tb.TargetCancelled:
        mark(path, "swallowed")
    time.sleep(60)


def takes_first_rung2_signal(path: str, name: str = "SIGTERM") -> None:
    """Takes rung 2's first signal (SIGTERM in a worker process, SIGUSR2 in a Ray task)
    before threadbridge's handler can see it, as CPython does when the signal arrives just
    before the target's thread enters a blocking call (the C handler runs, the Python one
    only once the call returns), then blocks."""
    signum = signal.Signals[name]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    mark(path, "started")
    signal.sigwait({signum})
    mark(path, "took the signal")  # nothing can interrupt this: the signal is blocked
    try:
        # A signal sent again while this target was slow to reach sigwait() is pending:
        # it lands as the mask is lifted. Else it interrupts the sleep.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        time.sleep(60)
    except tb.TargetCancelled:
        mark(path, "interrupted")
        raise


def spawn_grandchild_and_return(path: str) -> int:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return child.pid


def busy_until_file(path: str) -> None:
    mark(path, str(os.getpid()))
    while not Path(path + ".go").exists():
        time.sleep(0.01)


def sigint_self_then_return() -> str:
    os.kill(os.getpid(), signal.SIGINT)  # delivered before kill() returns, were it not ignored
    return "survived SIGINT"


def token_state() -> tuple[bool, bool]:
    return tb.cancel_requested(), tb.current_token().is_set()


def imports_of_worker() -> list[str]:
    return sorted(m for m in ("anyio", "trio") if m in sys.modules)


def _sleep_forever() -> None:
    while True:
        time.sleep(60)


def mp_grandchild(path: str) -> None:
    import multiprocessing

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = multiprocessing.get_context("spawn").Process(target=_sleep_forever)
    child.start()
    mark(path, str(child.pid))
    _sleep_forever()


def die_while_answering() -> None:
    """Send half of an answer frame, then die: a worker killed mid-result."""
    from threadbridge import _in_worker, _wire

    header = _wire.HEADER.pack(1000, _wire.ANSWER, 0)
    os.write(_in_worker._result_fd, header + b"x" * 10)
    os.kill(os.getpid(), signal.SIGKILL)


def closes_every_descriptor() -> str:
    """Closes every descriptor above stderr, the worker's pipes too, as a careless
    daemonizing library does."""
    os.closerange(3, 65536)
    return "closed"


def replaces_every_descriptor() -> str:
    """Points every open descriptor above stderr at /dev/null (os.dup2), the worker's
    pipes too."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd > 2 and fd != null:
            try:
                os.dup2(null, fd)
            except OSError:
                pass  # closed meanwhile (the listing's own)
    return "replaced"


def fork_and_return(child_returns: bool) -> str:
    pid = os.fork()
    if pid == 0:
        if child_returns:
            return "from the child"  # the worker must not let this through
        os._exit(0)
    os.waitpid(pid, 0)
    return "from the worker"


def long_c_call(n: int) -> int:
    """One C call that holds the GIL throughout: no bytecode boundary to stop at."""
    return sum(range(n))


def busy_then_c_call(path: str) -> int:
    """Marks its start, then holds the GIL in one C call for good."""
    mark(path, "started")
    return long_c_call(10**12)


def timed_c_call(n: int) -> tuple[float, float, float]:
    """long_c_call, timed: (CPU seconds of this thread, and when it started and ended by
    time.perf_counter(), which is the system's monotonic clock, the same in every
    process on Linux)."""
    cpu, start = time.thread_time(), time.perf_counter()
    long_c_call(n)
    return time.thread_time() - cpu, start, time.perf_counter()


def stress_target(i: int, behaviour: str, amount: float) -> tuple[str, int]:
    """One of several behaviours, for the stress and property tests."""
    if behaviour == "return":
        return ("ok", i)
    if behaviour == "raise":
        raise CustomError(str(i))
    if behaviour == "check":
        deadline = time.monotonic() + amount
        while time.monotonic() < deadline:
            tb.check_cancelled()
        return ("ok", i)
    if behaviour == "tb_sleep":
        tb.sleep(amount)
        return ("ok", i)
    if behaviour == "sleep":  # blocking C call: rung 2 by SIGTERM in a worker
        time.sleep(amount)
        return ("ok", i)
    if behaviour == "ignore_term":  # only rung 3 stops it, before `amount` passes
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(amount)
        return ("ok", i)
    raise ValueError(behaviour)


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """An exception tblib cannot pickle (it sets attributes on unpickling), plain pickle can."""


def raise_frozen() -> None:
    raise FrozenError()


def set_in_proxy(proxy: Any, key: str, value: int) -> None:
    """Uses a multiprocessing Manager proxy: needs the parent's authkey."""
    proxy[key] = value


def register_atexit(path: str) -> None:
    import atexit

    atexit.register(mark, path, "atexit ran")
    print("buffered, not flushed", end="")


def own_sigterm_handler(path: str) -> str:
    """Installs its own SIGTERM handler, which ends the work when rung 2 comes."""
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    mark(path, "started")
    while not stop:
        time.sleep(0.001)
    return "stopped by my own handler"


def exit_code(code: int) -> None:
    sys.exit(code)


def recurse(n: int = 0) -> int:
    return recurse(n + 1)


def pipes_a_child_inherits() -> list[int]:
    """Which of the worker's pipe ends a child started with close_fds=False holds."""
    from threadbridge import _in_worker

    ours = {_in_worker._result_fd, *_in_worker._pipe_fds}
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(' '.join(os.listdir('/proc/self/fd')))"],
        close_fds=False,
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(ours & {int(fd) for fd in child.stdout.split()})


def block_sigterm() -> str:
    """Leaves SIGTERM blocked and ignored behind it, as a careless target might."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return "left SIGTERM blocked and ignored"


def children_then_sleep(path: str) -> None:
    """Starts a child that ignores SIGTERM and one that does not, then blocks: rung 2
    interrupts it, and leaves the children to whoever cleans up."""
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None
    stubborn.stdout.readline()  # its SIGTERM is ignored from here on
    meek = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    mark(path, f"{stubborn.pid} {meek.pid}")
    time.sleep(60)


def fork_then_crash(path: str) -> None:
    """Forks a copy that keeps every descriptor (the worker's pipes too) and sleeps on,
    then the worker dies without answering."""
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    mark(path, str(pid))
    os._exit(3)


class ExitsWhenPickled:
    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit("refusing to be pickled")


class ExitsWhenLoaded:
    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.exit, (5,))


class HostileError(Exception):
    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit("refusing to be pickled")


def return_exits_when_pickled() -> object:
    return ExitsWhenPickled()


def return_exits_when_loaded() -> object:
    return ExitsWhenLoaded()


def raise_hostile() -> None:
    raise HostileError("hostile")


_initialized: object = None


def initialize(path: str, value: object) -> None:
    """A ProcessPool initializer: notes each run in ``path``, keeps ``value``."""
    global _initialized
    mark(path, "initialized")
    _initialized = value


def initialize_after(path: str, gate: str) -> None:
    """A ProcessPool initializer that notes its run in ``path``, then holds the worker's
    boot until the file ``gate`` exists."""
    mark(path, "waiting")
    while not os.path.exists(gate):
        time.sleep(0.005)


def initialized() -> tuple[int, object]:
    return os.getpid(), _initialized


def failing_initializer(path: str) -> None:
    mark(path, "initializer ran")
    raise CustomError("the initializer failed")


def pid_and_parent() -> tuple[int, int]:
    return os.getpid(), os.getppid()


def children_then_spin(path: str) -> None:
    """Starts a child process, notes both pids, then spins in pure Python for ever."""
    child = subprocess.Popen(["sleep", "1000"])
    mark(path, f"{os.getpid()} {child.pid}")
    while True:
        pass


def restart_after_sigterm() -> str:
    """Leaves SA_RESTART set for SIGTERM behind it: a blocking call that SIGTERM then
    interrupts is restarted by the system, and the worker's handler never runs."""
    signal.siginterrupt(signal.SIGTERM, False)
    return "left SIGTERM restarting system calls"


def blocks_in(path: str, call: str) -> None:
    """Blocks in a system call that only a signal ends: a read of a pipe nobody writes,
    or a lock that is never released."""
    r, w = os.pipe()
    lock = threading.Lock()
    lock.acquire()
    try:
        mark(path, str(os.getpid()))
        if call == "read":
            os.read(r, 1)
        else:
            lock.acquire()
    finally:
        os.close(r)
        os.close(w)
        mark(path, "finally")


def forking_initializer(path: str, child_returns: bool) -> None:
    """A ProcessPool initializer that forks: its child returns into the worker (or exits)."""
    if os.fork() == 0 and not child_returns:
        os._exit(0)
    mark(path, str(os.getpid()))


def exiting_initializer(path: str, code: int) -> None:
    mark(path, "initializer ran")
    os._exit(code)


# A module whose import in the parent waits here (see test_fork_while_a_thread_imports).
IMPORTING = threading.Event()
IMPORT_GATE = threading.Event()


def value_of(module: str) -> object:
    return importlib.import_module(module).VALUE


def sleeps_on_after_rung2(path: str, after: float) -> str:
    """Ignores its token; when rung 2 lands, notes it and goes on for ``after`` seconds."""
    mark(path, "started")
    try:
        time.sleep(60)
    except tb.TargetCancelled:
        mark(path, "interrupted")
        time.sleep(after)
        return "ended by itself"
    return "slept"


def spin_marked(path: str) -> None:
    """Marks its start, then spins in pure Python, never checking its token. (The mark is
    written here, not by mark(): a rung 2 that comes as soon as the mark is seen may
    find the target on its way out of the call that wrote it, and tests say where it was.)"""
    with open(path, "a") as f:
        f.write("started\n")
    while True:
        pass


def sleep_marked(path: str, seconds: float) -> str:
    mark(path, "started")
    time.sleep(seconds)
    return "slept"


def kill_own_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def ignore_term_marked(path: str) -> None:
    """Only rung 3 stops it: SIGTERM ignored, then blocked in a C call."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mark(path, "started")
    time.sleep(60)


@tb.killable(timeout=30, backend="process")
def killable_parent() -> int:
    """A decorated target: in a worker of the calling process (not of a nested one)."""
    return os.getppid()


def raise_after_file(path: str) -> None:
    busy_until_file(path)
    raise Exception("this is an exception")  # noqa: TRY002 - any exception will do


def capture(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


class Thing:
    def method(self) -> None:
        pass


def make_thing(_: object) -> Thing:
    return Thing()


# --- OpenTelemetry (tests/test_otel.py) --------------------------------------------------


def current_trace() -> tuple[int, int]:
    """The trace and span ids of the span current where the target runs (0, 0: none)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context.trace_id, context.span_id


def open_child_span() -> tuple[int, int]:
    """Opens a span with this interpreter's tracer provider: (its trace id, its parent's
    span id); (0, 0) if no provider records spans here."""
    from opentelemetry import trace

    with trace.get_tracer("tests").start_as_current_span("inner") as span:
        parent = getattr(span, "parent", None)
        if parent is None:
            return 0, 0
        return span.get_span_context().trace_id, parent.span_id


def install_tracer_provider() -> None:
    """A worker's initializer: spans opened there are recorded (and never exported)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())


def otel_imported() -> list[str]:
    return sorted(name for name in list(sys.modules) if name.split(".")[0] == "opentelemetry")
