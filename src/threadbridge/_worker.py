"""The worker process: runs one target at a time for its parent.

Started as ``python -c "from threadbridge._worker import main; main()"`` with three pipe
descriptors as arguments (or forked, see ``after_fork``). It imports neither anyio nor
trio: start-up time is a cost every cold call pays.

Threads here:

* the main thread reads jobs from the job pipe and runs each target (the shared
  algorithm of ``_target.TargetState.run``); SIGTERM (rung 2) is delivered to it and
  turned into TargetCancelled inside the target;
* a control thread reads the control pipe: rung 1 sets the running target's token,
  rung 2 sends SIGTERM to the worker's process group (grandchildren too). When the pipe
  reaches end of file the parent has died, and the control thread kills the whole group:
  a worker never outlives its parent.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
import threading
import types
from types import FrameType
from typing import Any, NoReturn

from . import _jobs, _pickling, _signals, _wire
from ._errors import TargetCancelled
from ._target import Outcome, TargetState, resend_delays
from ._token import Token


class _Job:
    __slots__ = ("heard", "id", "signalled", "state")

    def __init__(self, job_id: int, state: TargetState) -> None:
        self.id = job_id
        self.state = state
        self.signalled = False  # the control thread sent rung 2's SIGTERM while it ran
        self.heard = False  # and the worker's SIGTERM handler has run since


_current: _Job | None = None
_interrupt_for = 0  # job id that the last rung-2 SIGTERM was meant for
_last_started = 0  # job ids only grow: a message for an older job is stale
_early: set[int] = set()  # jobs whose stop arrived before they started: never run them
_lock = threading.Lock()
_pid = 0  # this worker's pid: a target's fork that returns must not act as the worker
_result_fd = -1  # kept for fault-injection tests
_pipe_fds: tuple[int, ...] = ()
_pipe_ids: tuple[tuple[int, int], ...] = ()  # (device, inode) of each, as they started

# The exit status of a worker whose pipes to the parent a target closed or replaced
# (sysexits' EX_IOERR); the parent reports it as such.
PIPES_LOST = 74


def _pipe_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _pipes_intact() -> bool:
    """Whether the worker's pipe descriptors are still the pipes it started with."""
    try:
        return tuple(_pipe_id(fd) for fd in _pipe_fds) == _pipe_ids
    except OSError:
        return False


def _pipes_lost(what: str) -> NoReturn:
    """A target closed or replaced the worker's pipes: say so, and end the worker with
    the status that tells the parent why (it kills what is left of the group)."""
    message = (
        f"threadbridge worker {os.getpid()}: {what}: its pipes to the parent were closed "
        "or replaced by the target (os.closerange(), os.dup2()?); a process target must "
        "close only the descriptors it opened\n"
    )
    try:
        os.write(2, message.encode())
    except OSError:
        pass
    os._exit(PIPES_LOST)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    job = _current
    if job is None or job.id != _interrupt_for:
        return  # not meant for what runs now (idle, or a job that already ended)
    job.heard = True
    job.state.interrupt_here("interrupted by SIGTERM (rung 2)")


def _resend(thread_id: int) -> None:
    # To the target's thread itself: only a signal delivered to it ends a blocking call.
    signal.pthread_kill(thread_id, signal.SIGTERM)


def _control(fd: int) -> None:
    global _interrupt_for
    # SIGTERM must reach the main thread, where the target runs.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    reader = _wire.FrameReader(fd)
    unheard: _Job | None = None  # sent rung 2; its handler has not run yet (see RESEND_FIRST)
    delays = resend_delays()
    while True:
        if unheard is not None and not reader.ready(next(delays)):
            unheard = _send_again(unheard)
            continue
        try:
            frame = reader.read()
        except OSError:
            frame = None
        if frame is None:
            if not _pipes_intact():
                _pipes_lost("its control pipe failed")
            # The parent has died (or closed us off): take the whole group down now.
            os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(1)  # pragma: no cover - the line above already ended us
        kind, job_id, _ = frame
        with _lock:
            job = _current
            if job is None or job.id != job_id:
                if job_id > _last_started:  # sent right after the job, read before it
                    _early.add(job_id)
                continue
            if kind == _wire.STOP:
                job.state.token._set()
            elif kind == _wire.INTERRUPT and job.state.running:
                _interrupt_for = job_id
                job.signalled = True
                os.killpg(os.getpgrp(), signal.SIGTERM)
                unheard, delays = job, resend_delays()


def _send_again(job: _Job) -> _Job | None:
    """Rung 2's SIGTERM once more to the target's thread, if the worker's handler has not
    run since it was sent; the job to watch next, or None when there is nothing to do."""
    with _lock:
        if job is not _current or job.heard or not job.state.running:
            return None
        if _signals.getsignal(signal.SIGTERM) is not _on_sigterm:
            return None  # the target handles SIGTERM itself: that is its to take
        signal.pthread_kill(job.state.thread_id, signal.SIGTERM)
        return job


def _run(job_id: int, payload: bytes) -> bytes:
    """Run one job; return the answer for the parent."""
    global _current, _last_started
    state = TargetState(Token(), threading.Lock())
    state.resend = _resend
    with _lock:
        _last_started = job_id
        if job_id in _early:
            state.token._set()  # it will not start
        _early.clear()
        job = _current = _Job(job_id, state)

    def call() -> Outcome:
        try:
            try:
                func, args = pickle.loads(payload)
            except TargetCancelled:
                raise
            except BaseException as exc:
                note = f"the worker could not unpickle the target or its arguments: {exc}"
                if main_error:
                    note += f" ({main_error})"
                return (False, _pickling.remote_error(exc, note))
            try:
                return (True, func(*args))
            except BaseException as exc:
                return (False, exc)
        finally:
            if os.getpid() != _pid:
                # The target forked and its child has returned from it: that child must
                # not go on to answer the parent or read jobs meant for the real worker.
                os._exit(0)

    outcome = state.run(call)
    with _lock:
        _current = None
    interrupted = state.interrupted or job.signalled
    if outcome is None:
        return _pickling.dumps_answer(_pickling.NOT_STARTED, None, interrupted)
    ok, value = outcome
    how = _pickling.RETURNED if ok else _pickling.RAISED
    return _pickling.dumps_answer(how, value, interrupted)


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
        serve(job_fd, control_fd, result_fd)
        # A forked worker must not run the atexit handlers it inherited from the parent
        # (they would act on the parent's resources): flush and leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    finally:
        os._exit(1)


def _open_fds() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):  # Linux; macOS and the BSDs
        try:
            return [int(name) for name in os.listdir(folder)]
        except OSError:
            continue
    import resource  # pragma: no cover - neither: try them all, up to a sane bound

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # may be "unlimited"
    return list(range(3, limit if 0 < limit <= 65536 else 65536))


def serve(job_fd: int, control_fd: int, result_fd: int) -> None:
    global _pid, _result_fd, _pipe_fds, _pipe_ids
    _pid, _result_fd, _pipe_fds = os.getpid(), result_fd, (job_fd, control_fd, result_fd)
    _pipe_ids = tuple(_pipe_id(fd) for fd in _pipe_fds)
    for fd in (job_fd, control_fd, result_fd):
        # Only this process may read or write them: a program the target starts, even
        # with close_fds=False, gets none of them.
        os.set_inheritable(fd, False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # A parent that ignores SIGCHLD passes that on, even through exec; the system would
    # then discard the exit status of every process a target starts (subprocess would
    # report 0 for each). Its blocked signals pass on too: SIGTERM blocked here would
    # leave rung 2 undelivered, and every stop would go on to rung 3.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGCHLD})
    # The control thread needs the GIL to set a token while a pure-Python target holds
    # it; the default 5 ms switch interval would add up to 5 ms to every rung 1.
    sys.setswitchinterval(0.0005)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _save_signals()
    threading.Thread(target=_control, args=(control_fd,), name="control", daemon=True).start()
    jobs = _wire.FrameReader(job_fd)
    booted = False  # READY sent: the first settings (and the initializer) are done
    while True:
        try:
            frame = jobs.read()
        except OSError:
            frame = None
        if frame is None and not _pipes_intact():
            _pipes_lost("reading its next job failed")
        if frame is None or frame[0] == _wire.EXIT:
            break
        kind, job_id, payload = frame
        if kind == _wire.INIT:
            if not _apply(pickle.loads(payload)):
                break  # its initializer failed: the parent has been told, and ends us
            if not booted:
                booted = True
                _wire.write_frame(result_fd, _wire.READY)
            continue
        answer = _run(job_id, payload)
        try:
            _wire.write_frame(result_fd, _wire.ANSWER, job_id, answer)
        except OSError:
            if not _pipes_intact():
                _pipes_lost("sending an answer failed")
            raise
        _restore_signals()  # what the target changed; after answering, off the call's path
    # Asked to exit (or the parent closed the job pipe): end like a Python program, so
    # that atexit handlers run and buffered output is flushed.


# The worker's own signal state, which every job starts with: a target that blocks
# SIGTERM or installs a handler must not disable rung 2 (or the worker's own SIGINT and
# SIGPIPE settings) for the jobs after it. Only the signals the worker relies on are
# checked, and read through _signals: this runs on every job's path.
_OWN_SIGNALS = tuple(
    int(getattr(signal, name))
    for name in ("SIGTERM", "SIGINT", "SIGPIPE")
    if hasattr(signal, name)  # no SIGPIPE on Windows, where this module is only imported
)
_base_mask: set[int] = set()
_base_handlers: dict[int, Any] = {}


def _save_signals() -> None:
    global _base_mask
    _base_mask = set(_signals.pthread_sigmask(signal.SIG_BLOCK, ()))
    for signum in _OWN_SIGNALS:
        _base_handlers[signum] = _signals.getsignal(signum)


def _restore_signals() -> None:
    if _signals.pthread_sigmask(signal.SIG_BLOCK, ()) != _base_mask:
        _signals.pthread_sigmask(signal.SIG_SETMASK, _base_mask)
    for signum, handler in _base_handlers.items():
        if _signals.getsignal(signum) != handler:
            signal.signal(signum, handler)
    # signal.siginterrupt(SIGTERM, False) leaves the handler as it is, but has the system
    # restart a call that SIGTERM interrupts (SA_RESTART): a read, a lock, a recv would
    # then never return to let rung 2 land. Nothing tells whether a target did it, so it
    # is undone after every job (one sigaction, after the answer has gone).
    signal.siginterrupt(signal.SIGTERM, True)


def _apply(settings: dict[str, Any]) -> bool:
    """Take the parent's settings; False if the pool's initializer failed here."""
    if "sys_path" in settings:
        sys.path[:] = settings["sys_path"]
    if "argv" in settings:
        sys.argv[:] = settings["argv"]
    if "environ" in settings:
        environ = settings["environ"]
        for name in [name for name in os.environ if name not in environ]:
            del os.environ[name]
        os.environ.update(environ)
    if "cwd" in settings:
        try:
            os.chdir(settings["cwd"])
        except OSError:
            pass  # gone meanwhile, or out of this process's reach: the target runs where it is
    if "authkey" in settings:
        from multiprocessing import process

        process.current_process().authkey = settings["authkey"]
    if settings.get("main"):
        try:
            _import_main(tuple(settings["main"]))
        finally:
            _only_the_worker()
    if "initializer" in settings and not _initialize(settings["initializer"]):
        return False
    for name in settings.get("warm", ()):
        # What jobs have needed so far, imported while this worker idles: the call
        # that takes it does not wait for them.
        try:
            importlib.import_module(name)
        except BaseException:
            pass  # the job that needs it will say why
    return True


def _only_the_worker() -> None:
    """After user code that may have forked (the main script's import, the initializer):
    a child that returned from it must not go on to read the worker's jobs."""
    if os.getpid() != _pid:
        os._exit(0)


def _initialize(payload: bytes) -> bool:
    """Run the pool's initializer; if it raises, send its error to the parent."""
    _wire.write_frame(_result_fd, _wire.INITIALIZING)
    try:
        try:
            func, args = pickle.loads(payload)
            func(*args)
        finally:
            _only_the_worker()
    except BaseException as exc:
        answer = _pickling.dumps_answer(_pickling.RAISED, exc, False)
        _wire.write_frame(_result_fd, _wire.INIT_FAILED, 0, answer)
        return False
    return True


importing_main = False  # true while the main script runs as __mp_main__
_main_imported: tuple[str, str] | None = None  # what this process imported as __mp_main__
main_error = ""  # why importing it failed, for the jobs that then cannot find their function


def _import_main(source: tuple[str, str]) -> None:
    """Import the parent's main script as ``__mp_main__`` and make ``__main__`` refer to
    it, as multiprocessing's spawn does: its functions and classes can then travel by
    reference, and its ``if __name__ == "__main__":`` block does not run here. Reports the
    names it binds to the parent."""
    global importing_main, main_error, _main_imported
    how, where = source
    current = sys.modules["__main__"]
    if _main_imported == source:  # a fork server imported it already (not multiprocessing,
        _report_main_names(source, current)  # whose import names __main__ __mp_main__ too)
        return
    if how == "path" and getattr(current, "__file__", None) == where:
        return  # a forked worker: the parent's own main is here already
    if how == "name" and getattr(getattr(current, "__spec__", None), "name", None) == where:
        return
    import runpy

    importing_main = True
    try:
        if how == "name":
            content = runpy.run_module(where, run_name="__mp_main__", alter_sys=True)
        else:
            content = runpy.run_path(where, run_name="__mp_main__")
    except BaseException as exc:
        main_error = (
            f"the worker imports the main script ({where}) as __mp_main__, so that its "
            f"functions can run here, and that failed: {type(exc).__name__}: {exc}"
        )
        import traceback

        print(f"threadbridge: {main_error}", file=sys.stderr)
        traceback.print_exc()
        return
    finally:
        importing_main = False
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    _main_imported = source
    _jobs.main_names_here = frozenset(name for name in content if isinstance(name, str))
    _report_main_names(source, module)


def _report_main_names(source: tuple[str, str], module: types.ModuleType) -> None:
    if _result_fd >= 0:  # a worker (a fork server has no parent to tell)
        names = sorted(name for name in vars(module) if isinstance(name, str))
        _wire.write_frame(_result_fd, _wire.NAMES, 0, pickle.dumps((source, names)))
