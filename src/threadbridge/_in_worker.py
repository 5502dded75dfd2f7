"""The worker process: runs one target at a time for its parent.

Started as ``python -c "from threadbridge._in_worker import main; main()"`` with three pipe
descriptors as arguments (or forked, see ``after_fork``). It imports neither anyio nor
trio: start-up time is a cost every cold call pays.

Threads here:

* the main thread reads jobs from the job pipe and runs each on the worker's target
  host (``_host``); SIGTERM (rung 2) is delivered to it and turned into TargetCancelled
  inside the target;
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
from collections.abc import Callable
from typing import NoReturn

from . import _fork, _locks, _settings, _wire, _worker_signals
from ._host import Host
from ._target import resend_delays

# The worker's host of targets (made as the worker starts serving).
host: Host | None = None
_result_fd = -1  # kept for fault-injection tests
_pipe_fds: tuple[int, ...] = ()
_pipe_ids: tuple[tuple[int, int], ...] = ()  # (device, inode) of each, as they started


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
    os._exit(_wire.PIPES_LOST)


def _control(fd: int, host: Host, reply: Callable[[int, int, bytes], None]) -> None:
    # SIGTERM must reach the main thread, where the target runs.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    reader = _wire.FrameReader(fd)
    unheard = None  # sent rung 2; its handler has not run yet (see RESEND_FIRST)
    delays = resend_delays()
    while True:
        if unheard is not None and not reader.ready(next(delays)):
            if not host.send_again(unheard):
                unheard = None
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
        if kind == _wire.STOP:
            host.stop(job_id)
        elif kind == _wire.ASK_WHERE or kind == _wire.SAY_WHERE:
            # where() asks for the stack (HERE); rung 3 for the line and the stack (WHERE).
            found: object
            if kind == _wire.ASK_WHERE:
                answer, found = _wire.HERE, host.where_now(job_id)
            else:
                answer, found = _wire.WHERE, host.seen_now(job_id)
            try:
                reply(answer, job_id, pickle.dumps(found))
            except OSError:
                pass  # the parent is gone: the next read says so
        elif kind == _wire.INTERRUPT:
            # To the whole process group: what the target started gets it too.
            job = host.interrupt(job_id, _signal_group)
            if job is not None:
                unheard, delays = job, resend_delays()


def _signal_group(thread_id: int) -> None:
    os.killpg(os.getpgrp(), signal.SIGTERM)


def main() -> None:
    """Entry point of a spawned worker: the pipe descriptors come as arguments."""
    job_fd, control_fd, result_fd = (int(a) for a in sys.argv[1:4])
    serve(job_fd, control_fd, result_fd)


def after_fork(job_fd: int, control_fd: int, result_fd: int) -> None:
    """Entry point of a forked worker, in the child right after os.fork(). Never returns."""
    global host
    try:
        _fork.release_imports_of_lost_threads()  # before this child imports anything
        _fork.forget_inherited_output()
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
        host = None  # a fork server's (or a parent worker's) is not this one's
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
    global host, _result_fd, _pipe_fds, _pipe_ids
    _result_fd, _pipe_fds = result_fd, (job_fd, control_fd, result_fd)
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
    # The main thread writes answers, the control thread where a target was: one frame
    # at a time on the result pipe.
    writing = _locks.Lock()

    def write(kind: int, job_id: int = 0, payload: bytes = b"") -> None:
        with writing:
            _wire.write_frame(result_fd, kind, job_id, payload)

    def tell_where(job_id: int, where: tuple[str, str]) -> None:
        try:
            write(_wire.WHERE, job_id, pickle.dumps(where))
        except OSError:
            pass  # the parent is gone: the control thread finds out next

    host = Host(
        signal.SIGTERM,
        where="by SIGTERM",
        loads=pickle.loads,
        host_name="the worker",
        hint=lambda: _settings.main_error,
        tell_where=tell_where,
    )
    host.install()
    _worker_signals.save()
    _worker_signals.watch_siginterrupt()
    threading.Thread(
        target=_control, args=(control_fd, host, write), name="control", daemon=True
    ).start()

    def tell(kind: int, payload: bytes) -> None:
        write(kind, 0, payload)

    jobs = _wire.FrameReader(job_fd)
    booted = False  # READY sent: the first settings (and the initializer) are done
    trace = None  # the trace context of the next job, if the caller traces
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
            if not _settings.apply(pickle.loads(payload), pid=host.pid, tell=tell):
                break  # its initializer failed: the parent has been told, and ends us
            if not booted:
                booted = True
                write(_wire.READY)
            continue
        if kind == _wire.TRACE:
            trace = pickle.loads(payload)
            continue
        answer = host.run(job_id, payload, trace=trace)
        trace = None
        try:
            write(_wire.ANSWER, job_id, answer)
        except OSError:
            if not _pipes_intact():
                _pipes_lost("sending an answer failed")
            raise
        _worker_signals.restore()  # what the target changed; after answering, off the call's path
    # Asked to exit (or the parent closed the job pipe): end like a Python program, so
    # that atexit handlers run and buffered output is flushed.
