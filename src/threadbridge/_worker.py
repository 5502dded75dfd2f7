"""The worker process: runs one target at a time for its parent.

Started by the parent as ``python -c "from threadbridge._worker import main; main()"``
with three pipe descriptors as arguments. It imports neither anyio nor trio: start-up
time is a cost every cold call pays.

Threads here:

* the main thread reads jobs from the job pipe and runs each target; SIGTERM (rung 2)
  is delivered to it and turned into TargetCancelled inside the target;
* a control thread reads the control pipe: rung 1 sets the running target's token,
  rung 2 sends SIGTERM to the worker's process group (grandchildren too). When the pipe
  reaches end of file the parent has died, and the control thread kills the whole group:
  a worker never outlives its parent.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import traceback
from types import FrameType

from . import _wire
from ._errors import RemoteError, TargetCancelled
from ._token import NEVER_SET, TargetState, Token, _Interrupted, _local


class _Job:
    __slots__ = ("id", "state")

    def __init__(self, job_id: int, state: TargetState) -> None:
        self.id = job_id
        self.state = state


_current: _Job | None = None
_interrupt_for = 0  # job id that the last rung-2 SIGTERM was meant for
_last_started = 0  # job ids only grow: a message for an older job is stale
_early: dict[int, int] = {}  # rungs that arrived before their job started
_lock = threading.Lock()
_pid = 0  # this worker's pid: a target's fork that returns must not act as the worker
_result_fd = _control_fd = -1  # kept for fault-injection tests


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    job = _current
    if job is None or job.id != _interrupt_for:
        return  # not meant for what runs now (idle, or a job that already ended)
    state = job.state
    if not state.running or state.interrupt_requested:
        return
    state.interrupt_requested = True
    if state.depth:
        state.deferred = True  # raised when the outermost uninterruptible() exits
        return
    raise _Interrupted("interrupted by SIGTERM (rung 2)")


def _control(fd: int) -> None:
    global _interrupt_for
    # SIGTERM must reach the main thread, where the target runs.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    while True:
        try:
            frame = _wire.read_frame(fd)
        except OSError:
            frame = None
        if frame is None:
            # The parent has died (or closed us off): take the whole group down now.
            os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(1)  # pragma: no cover - the line above already ended us
        kind, job_id, _ = frame
        with _lock:
            job = _current
            if job is None or job.id != job_id:
                if job_id > _last_started:  # sent right after the job, read before it
                    _early[job_id] = max(kind, _early.get(job_id, 0))
                continue
            if kind == _wire.CANCEL:
                job.state.token._set()
            elif kind == _wire.INTERRUPT and job.state.running:
                _interrupt_for = job_id
                os.killpg(os.getpgrp(), signal.SIGTERM)


def _dumps(value: object) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle  # lambdas, closures, classes defined in __main__

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return,unused-ignore]


def _exception_payload(exc: BaseException, flag: int) -> bytes:
    """The exception with its traceback (tblib), or a RemoteError if it will not travel."""
    try:
        from tblib import pickling_support

        pickling_support.install(exc)
        data = _dumps(("raise", exc, flag))
        pickle.loads(data)  # the parent must be able to load it too
        return data
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return _dumps(("raise", RemoteError(name, str(exc), text), flag))


def _run(job_id: int, payload: bytes) -> bytes:
    """Run one job; return the pickled outcome for the parent."""
    global _current, _last_started
    with _lock:
        _last_started = job_id
        early = _early.pop(job_id, 0)
        _early.clear()
    if early == _wire.INTERRUPT:
        stopped = TargetCancelled("interrupted (rung 2) before it started")
        return _dumps(("raise", stopped, 2))
    try:
        func, args = pickle.loads(payload)
    except BaseException as exc:
        note = f"the worker could not unpickle the target or its arguments: {exc}"
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return _dumps(("raise", RemoteError(type(exc).__qualname__, note, text), 0))
    state = TargetState(Token(), threading.Lock())
    state.thread_id = threading.get_ident()
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        signal.signal(signal.SIGTERM, _on_sigterm)  # a previous target may have changed it
    if early == _wire.CANCEL:
        state.token._set()
    with _lock:
        _current = _Job(job_id, state)
    _local.state = state
    _local.token = state.token
    try:
        # Once running is set, SIGTERM may be turned into TargetCancelled at any
        # bytecode: just before the target's first line, or just after its last.
        state.running = True
        try:
            outcome: tuple[bool, object] = (True, func(*args))
        except BaseException as exc:
            outcome = (False, exc)
    except TargetCancelled as exc:  # rung 2 landed in this bookkeeping
        outcome = (False, exc)
    if os.getpid() != _pid:
        # The target forked and its child has returned from it: that child must not go
        # on to answer the parent or read jobs meant for the real worker.
        os._exit(0)
    while True:
        try:
            state.running = False
            break
        except TargetCancelled:
            continue  # the same late SIGTERM; it is raised once at most
    _local.state = None
    _local.token = NEVER_SET
    with _lock:
        _current = None
    # How far the ladder had got when the target ended: 2 rung 2, 1 token set, 0 neither.
    flag = 2 if state.interrupt_requested else 1 if state.token._flag else 0
    ok, value = outcome
    if ok:
        try:
            return _dumps(("return", value, flag))
        except Exception as exc:
            err = TypeError(
                f"the target's result ({type(value).__qualname__}) cannot be pickled to "
                f"send it back from the worker process: {exc}"
            )
            return _dumps(("raise", err, flag))
    assert isinstance(value, BaseException)
    return _exception_payload(value, flag)


def main() -> None:
    """Entry point of a spawned worker: the pipe descriptors come as arguments."""
    job_fd, control_fd, result_fd = (int(a) for a in sys.argv[1:4])
    serve(job_fd, control_fd, result_fd)


def after_fork(job_fd: int, control_fd: int, result_fd: int) -> None:
    """Entry point of a forked worker, in the child right after os.fork(). Never returns."""
    global _lock, _current, _interrupt_for, _last_started
    try:
        os.setsid()
        keep = {0, 1, 2, job_fd, control_fd, result_fd}
        for fd in _open_fds():
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        signal.set_wakeup_fd(-1)  # the parent's event loop set one
        for signum in (signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_DFL)
        _lock = threading.Lock()  # another parent thread may have held it at the fork
        _current, _interrupt_for, _last_started = None, 0, 0
        _early.clear()
        from . import _token

        _token._EVENT_LOCK = threading.Lock()
        serve(job_fd, control_fd, result_fd)
    finally:
        os._exit(1)


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # pragma: no cover - no /proc (macOS): try them all
        import resource

        return list(range(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))


def serve(job_fd: int, control_fd: int, result_fd: int) -> None:
    global _pid, _result_fd, _control_fd
    _pid, _result_fd, _control_fd = os.getpid(), result_fd, control_fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # The control thread needs the GIL to set a token while a pure-Python target holds
    # it; the default 5 ms switch interval would add up to 5 ms to every rung 1.
    sys.setswitchinterval(0.0005)
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.Thread(target=_control, args=(control_fd,), name="control", daemon=True).start()
    _wire.write_frame(result_fd, _wire.READY)
    while True:
        frame = _wire.read_frame(job_fd)
        if frame is None or frame[0] == _wire.EXIT:
            break
        kind, job_id, payload = frame
        if kind == _wire.INIT:
            settings = pickle.loads(payload)
            sys.path[:] = settings["sys_path"]
            continue
        _wire.write_frame(result_fd, _wire.RESULT, job_id, _run(job_id, payload))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
