"""One worker process, seen from the parent: its pipes, its answers, its end.

Answers are read by the event loop itself (through the loop layer's fd watching): one
thread hop fewer per call than a reader thread would cost. However a worker ends (it
exits, crashes, or is killed at rung 3), ``_finish()`` runs once, in a thread of its own:
it takes down what is left of the worker's process group, reaps the worker within a
bound, closes the pipes, and then reports the run the worker had.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _jobs, _pickling, _signals, _wire
from ._errors import WorkerCrashed
from ._forkserver import ForkServed
from ._loop import Link

if TYPE_CHECKING:
    from ._pool import ProcessWork
    from ._process import WorkerPool

logger = logging.getLogger("threadbridge")

# Payloads larger than a pipe buffer are written from a helper thread, so that a slow
# worker never blocks the event loop.
_INLINE_WRITE = 60_000
# How long reaping a SIGKILLed worker may take before it is reported as stuck. A killed
# process normally goes within milliseconds; one in uninterruptible sleep (a hung NFS
# mount, a device driver) may take for ever. A guess, generous for a loaded machine.
REAP_TIMEOUT = 5.0
# How long a worker whose answer pipe has closed may take to exit by itself before it is
# taken as still running (its target closed the pipe). A dying process closes its
# descriptors just before it is gone; a guess, generous for a loaded machine.
PIPE_CLOSED_GRACE = 1.0


class WorkerProcess:
    """One worker process and the pipes to it. ``state`` belongs to its pool."""

    def __init__(self, pool: WorkerPool, link: Link, *, standby: bool = False) -> None:
        self.pool = pool
        self.link = link
        self.lock = threading.Lock()  # guards current, killed, finished
        # Guards the job and control pipes' numbers against reuse: a write in progress
        # keeps them open, and the last one out closes them once the worker has ended.
        self.pipe_lock = threading.Lock()
        self.writers = 0
        self.pipes_ending = False
        self.current: ProcessWork | None = None  # the job it runs
        self.killed: ProcessWork | None = None  # the job rung 3 killed it for
        # A job that rung 2 reached, answered; reported once the worker is retired.
        self.answered: tuple[ProcessWork, tuple[str, Any, bool]] | None = None
        self.finished = False
        self.fds_closed = False  # loop thread only: the result pipe and pidfd are closed
        self.state = "new"  # the pool's: idle, busy, retiring, dead, unreaped, gone
        self.used = False
        self.tasks = 0  # jobs answered
        # How far its boot has come: "starting", "initializer" (the pool's initializer
        # runs), "ready" (jobs may come). One that ends before "ready" failed to start.
        self.boot = "starting"
        self.idle_since = time.monotonic()
        self.parser = _wire.FrameParser()
        fds: list[int] = []
        try:
            for _ in range(3):  # out of descriptors (EMFILE) half-way: nothing stays open
                fds += os.pipe()
            job_r, self.job_fd, control_r, self.control_fd, self.result_fd, result_w = fds
            self.proc = pool.start_process(job_r, control_r, result_w)
        except BaseException:
            for fd in fds:
                _close(fd)
            raise
        for fd in (job_r, control_r, result_w):  # the worker's ends
            _close(fd)
        self.pid = self.proc.pid
        # The worker's own end, seen from the process itself where the platform allows
        # (Linux 5.3+): a pipe's end of file comes only once every copy of the pipe is
        # closed, and a process the target forked may hold one.
        try:
            self.pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        os.set_blocking(self.result_fd, False)
        self.has_authkey = False
        settings = worker_settings(warm=standby)
        # The parent's import path, directory and environment as this worker last heard
        # them. It inherited the environment as it started, unless a fork server (which
        # has the parent's of when it started) made it: that one hears with its first job.
        self.sys_path: object = settings["sys_path"]
        self.cwd: object = settings.get("cwd")
        forked_by_server = isinstance(self.proc, ForkServed)
        self.environ = None if forked_by_server else _environ_snapshot()
        if pool.initializer is not None:
            settings["initializer"] = pool.initializer
        self._send_settings(settings)
        link.post(self._watch)

    def _send_settings(self, settings: dict[str, object]) -> None:
        # The parent's multiprocessing authkey, as multiprocessing's own children get it,
        # so that Manager proxies and the like work in targets. Only once the parent has
        # imported multiprocessing: before that, nothing in it can have used the key.
        if not self.has_authkey and "multiprocessing" in sys.modules:
            from multiprocessing import process

            settings["authkey"] = bytes(process.current_process().authkey)
            self.has_authkey = True
        self._write(_wire.INIT, 0, pickle.dumps(settings))

    # --- talking to the worker ---------------------------------------------------------

    def take(self, work: ProcessWork) -> bool:
        """``work`` is this worker's job now (sent next, by ``send()``). False if the
        worker's end is being handled already: that took no job into account, and this
        one would never be reported."""
        changed = self._changed_settings()
        if changed or (not self.has_authkey and "multiprocessing" in sys.modules):
            self._send_settings(changed)
        with self.lock:
            if self.finished:
                return False
            self.current = work
        return True

    def _changed_settings(self) -> dict[str, object]:
        """The parent's import path, working directory and environment, where they have
        changed since this worker last heard: a target runs with the parent's, as it would
        in a thread, whether its worker started before or after the change."""
        changed: dict[str, object] = {}
        if sys.path != self.sys_path:
            changed["sys_path"] = self.sys_path = list(sys.path)
        cwd = _cwd()
        if cwd is not None and cwd != self.cwd:
            changed["cwd"] = self.cwd = cwd
        raw = getattr(os.environ, "_data", None)  # compared raw: 0.2 µs, not 20
        if raw is not None and raw != self.environ:
            changed["environ"] = dict(os.environ)
            self.environ = _environ_snapshot()
        return changed

    def send(self, work: ProcessWork, payload: bytes) -> None:
        if len(payload) <= _INLINE_WRITE:
            self._write_job(work.job_id, payload)
        else:
            threading.Thread(
                target=self._write_job,
                args=(work.job_id, payload),
                name="threadbridge-write",
                daemon=True,
            ).start()

    def _write_job(self, job_id: int, payload: bytes) -> None:
        self._write(_wire.RUN, job_id, payload)

    def control(self, kind: int, job_id: int) -> None:
        self._write(kind, job_id, control=True)

    def ask_to_exit(self) -> None:
        self._write(_wire.EXIT)

    def _write(
        self, kind: int, job_id: int = 0, payload: bytes = b"", *, control: bool = False
    ) -> None:
        """A frame to the worker (on its control pipe if ``control``), unless it has
        ended. The pipe stays open until the write is done: were it closed meanwhile, a
        new pipe (another worker's) could be given its number, and the rest of the frame
        would go there."""
        with self.pipe_lock:
            if self.pipes_ending:
                return  # the worker has ended: nothing reads any more
            self.writers += 1
            fd = self.control_fd if control else self.job_fd
        try:
            write_frame(fd, kind, job_id, payload)
        except OSError:
            pass  # the worker has died; end of file on its answers reports it
        finally:
            self._done_writing()

    def _done_writing(self) -> None:
        with self.pipe_lock:
            self.writers -= 1
            last = self.pipes_ending and not self.writers
        if last:
            self._close_pipes()

    def _end_pipes(self) -> None:
        """The worker has ended: close its job and control pipes now, or as the last
        write still in progress (to a pipe a stray process may hold) ends."""
        with self.pipe_lock:
            self.pipes_ending = True
            now = not self.writers
        if now:
            self._close_pipes()

    def _close_pipes(self) -> None:
        # Forgotten before they are closed: a child forked meanwhile must not close
        # their numbers, which a new pipe may reuse.
        fds, self.job_fd, self.control_fd = (self.job_fd, self.control_fd), -1, -1
        for fd in fds:
            _close(fd)

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def forget(self) -> None:
        """In a forked child of the parent: close this copy of the parent's pipes. Only
        those still open in the parent: the number of one it has closed may be in use
        again by now, for the pipes of the very worker this child is about to become."""
        fds: list[int | None] = [self.job_fd, self.control_fd]
        if not self.fds_closed:
            fds += [self.result_fd, self.pidfd]
        for fd in fds:
            if fd is not None and fd >= 0:
                _close(fd)

    def exited(self) -> bool:
        """Whether the worker process has ended, without reaping it (lock-free)."""
        if isinstance(self.proc, ForkServed):
            # Not our child: its server tells, a moment after the exit. The process's own
            # descriptor (Linux) tells at once. (Its number is ours while fds_closed is
            # unset: only the loop's thread, which calls this, sets it.)
            if self.proc.exited():
                return True
            return self.pidfd is not None and not self.fds_closed and _ready(self.pidfd)
        if not hasattr(os, "waitid"):
            # macOS before Python 3.13 cannot look without reaping: a worker that died
            # while idle is found out by the call it is given (WorkerCrashed).
            return False
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:
            return True  # reaped already

    def kill_for(self, work: ProcessWork, *, later: bool = False) -> bool:
        """Rung 3: SIGKILL the process group if it still runs ``work``; reaping and the
        report follow in ``finish()`` (in a thread of its own, unless ``later``: the
        caller then calls it). Returns at once."""
        with self.lock:
            if self.current is not work:
                return False  # it has just answered: that answer is reported
            self.current = None
            self.killed = work
        self.signal_group(signal.SIGKILL)
        if not later:
            self.finish_soon()
        return True

    # --- reading answers, in the event loop ---------------------------------------------

    def _watch(self) -> None:
        # If the loop is ending it watches nothing any more: its pool's shutdown ends
        # this worker.
        if not self.finished:
            name = "threadbridge worker reader"
            self.link.watch_readable(self.result_fd, self._on_readable, name)
            if self.pidfd is not None:
                self.link.watch_readable(self.pidfd, self._on_exit, "threadbridge worker exit")

    def _on_exit(self) -> bool:
        """The worker process has exited (its pidfd is readable)."""
        if self.fds_closed:
            return False
        # What it wrote before exiting is read first, so that an answer is never lost.
        while _ready(self.result_fd) and self._on_readable():
            pass
        self.finish_soon()
        return False

    def unwatch(self) -> None:
        self.link.unwatch(self.result_fd)
        if self.pidfd is not None:
            self.link.unwatch(self.pidfd)

    def _close_result_fd(self) -> None:
        # A watcher already woken for these descriptors may still run after this: it
        # checks fds_closed, for their numbers may belong to something else by then.
        self.fds_closed = True
        self.unwatch()
        _close(self.result_fd)
        if self.pidfd is not None:
            _close(self.pidfd)

    def _on_readable(self) -> bool:
        if self.fds_closed:
            return False
        try:
            data = os.read(self.result_fd, self.parser.read_size())
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.finish_soon()  # end of file: the worker has exited or been killed
            return False
        for kind, job_id, payload in self.parser.feed(data):
            if kind == _wire.NAMES:
                source, names = pickle.loads(payload)
                _jobs.set_main_names(tuple(source), frozenset(names))
                continue
            if kind == _wire.INITIALIZING:
                self.boot = "initializer"
                continue
            if kind == _wire.READY:
                self.boot = "ready"
                self.pool.booted()
                continue
            if kind == _wire.INIT_FAILED:
                self._init_failed(payload)
                return False
            if kind != _wire.ANSWER:
                continue
            work = self.current
            if work is None or work.job_id != job_id:
                continue  # killed meanwhile: the ladder has reported it
            answer = _pickling.loads_answer(payload, work.run.name)  # user code: unlocked
            with self.lock:
                if self.current is not work:
                    continue  # rung 3 took it while the answer was loaded
                self.current = None
                # Rung 2's SIGTERM went to the whole process group: what the target started
                # may still run there, or be a zombie. Such a worker is done: its group is
                # killed and reaped, then the answer is reported.
                retire = answer[2] or work.interrupt_sent
                if retire:
                    self.answered = (work, answer)
            if retire:
                self.signal_group(signal.SIGKILL)
                self.finish_soon()
                return False
            self.pool.returned(self)
            work.answered(*answer)
        return True

    def _init_failed(self, payload: bytes) -> None:
        """The pool's initializer raised in this worker: the pool is broken, this worker
        goes, and the job it had gets the error."""
        _, error, _ = _pickling.loads_answer(payload, "the ProcessPool's initializer")
        with self.lock:
            work, self.current = self.current, None
        told = self.pool.init_failed(error, for_job=work is not None)
        self.signal_group(signal.SIGKILL)
        self.finish_soon()
        if work is not None:
            work.answered(_pickling.RAISED, told, False)

    # --- the end ------------------------------------------------------------------------

    def _reap(self, timeout: float | None) -> int | None:
        # Woken the moment the process exits: a wait with a timeout would otherwise poll
        # (subprocess sleeps 1, 2, 4... ms between looks), and every cancel that ends in a
        # kill would wait for the next look. A fork server's worker is not our child: its
        # server tells when it exits.
        pidfd = None if isinstance(self.proc, ForkServed) else self.pidfd
        if timeout is not None and pidfd is not None and not _ready(pidfd, timeout):
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _drain(self, work: ProcessWork) -> tuple[str, Any, bool] | None:
        """The answer to ``work`` if the pipe holds it (the worker has exited)."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.result_fd, 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        for kind, job_id, payload in self.parser.feed(b"".join(chunks)):
            if kind == _wire.ANSWER and job_id == work.job_id:
                return _pickling.loads_answer(payload, work.run.name)
        return None

    def finish_soon(self) -> None:
        threading.Thread(target=self.finish, name="threadbridge-reap", daemon=True).start()

    def finish(self, *, drain: bool = False, loop_gone: bool = False) -> None:
        """The worker is gone or going: clean up once, from any thread but the loop's
        (reaping may take a moment). ``drain``: the loop reads no more, so an answer
        still in the pipe is read here. ``loop_gone``: the loop is ending and may never
        run a callback again: close the descriptors here."""
        with self.lock:
            if self.finished:
                return
            self.finished = True
            if drain and self.current is not None:
                answer = self._drain(self.current)
                if answer is not None:
                    self.answered, self.current = (self.current, answer), None
            crashed, self.current = self.current, None
            killed, self.killed = self.killed, None
            answered, self.answered = self.answered, None
        # End of file on its answers while the worker still runs: something in it closed
        # or replaced its answer pipe. A dying worker's descriptors close a moment before
        # it is gone: it is given that moment. Told only where its exit can be awaited
        # without reaping it (pidfd, Linux): the group must be killed before the reap.
        pipe_closed = (
            crashed is not None
            and not drain
            and self.pidfd is not None
            and not _ready(self.pidfd, PIPE_CLOSED_GRACE)
        )
        # Take down anything its targets left in its process group, while the unreaped
        # worker still holds the group's id (so that it cannot have been reused)...
        self.signal_group(signal.SIGKILL)
        returncode = self._reap(REAP_TIMEOUT)  # ...then reap it: never a zombie
        if returncode is None:
            logger.error(
                "worker process %d did not end within %ss of SIGKILL (stuck in the kernel?); "
                "it is counted in stats().unreaped_workers until it is reaped",
                self.pid,
                REAP_TIMEOUT,
            )
        self._end_pipes()
        # The loop may still watch the result pipe: only the loop's thread may stop that
        # and close it, or a new pipe given the same number would meet the old watch.
        if loop_gone or not self.link.call(self._close_result_fd):
            self.fds_closed = True  # the loop has ended (or is ending): nothing watches
            _close(self.result_fd)
            if self.pidfd is not None:
                _close(self.pidfd)
        # Ended by itself, not by the pool (rung 3, a kill after rung 2, asked to exit)?
        by_itself = killed is None and answered is None and self.state != "retiring"
        boot_error = None
        if by_itself and self.boot != "ready" and not self.pool.closed:
            boot_error = self._boot_error(returncode, crashed)
        early = by_itself and self.tasks == 0 and (crashed is None or boot_error is not None)
        self.pool.ended(
            self,
            reaped=returncode is not None,
            early=early,
            boot_error=boot_error,
            told=crashed is not None,
        )
        if killed is not None:
            killed.killed()
        if answered is not None:
            answered[0].answered(*answered[1])
        if crashed is not None:
            crashed.crashed(returncode, pipe_closed=pipe_closed, error=boot_error)
        if returncode is None:
            self._reap(None)
            self.pool.ended(self, reaped=True)

    def _boot_error(self, returncode: int | None, work: ProcessWork | None) -> WorkerCrashed:
        """What a worker that ended before it was ready tells the call it had (and the
        pool, which stops starting workers that cannot start)."""
        then = f"before it could run {work.run.name}" if work is not None else "while idle"
        if self.boot == "initializer":
            name = self.pool.initializer_name
            how, signum, exitcode = how_it_ended(self.proc, returncode, "in it")
            message = (
                f"the ProcessPool's initializer {name} ended its worker process (pid "
                f"{self.pid}) {then}: the worker {how}. An initializer must return (or "
                "raise, to fail the pool with its error); it must not exit the process"
            )
        else:
            how, signum, exitcode = how_it_ended(self.proc, returncode, "while starting")
            message = (
                f"the worker process (pid {self.pid}) {how}, {then}: it could not start "
                "(its standard error says why: an interpreter that cannot run, the main "
                "script or a package that fails to import, the process killed from outside)"
            )
        return WorkerCrashed(message, signal=signum, exitcode=exitcode, pid=self.pid)


def worker_settings(*, warm: bool) -> dict[str, object]:
    """What a new worker (or a fork server) takes from the parent before any job: the
    import path, argv, the main script to import as __mp_main__, and (``warm``: started
    ahead of need) the modules jobs have needed so far, to import while it idles."""
    _jobs.alias_main()  # before any worker can answer with a class of the main script
    settings: dict[str, object] = {
        "sys_path": list(sys.path),
        "argv": list(sys.argv),
        "main": _jobs.main_source(),
    }
    cwd = _cwd()
    if cwd is not None:
        settings["cwd"] = cwd
    if warm:
        settings["warm"] = ["tblib", "threadbridge._jobs", *_jobs.modules_used]
    return settings


def how_it_ended(
    proc: object, returncode: int | None, when: str = "without answering"
) -> tuple[str, int | None, int | None]:
    """How a process of ours (a worker, a fork server) that ended by itself did (``when``
    it did): words for an error, its signal, its exit code."""
    if returncode is None:
        return f"died {when}", None, None
    if returncode == 0 and _exit_status_discarded(proc):
        return (
            f"exited {when}; how it ended is unknown: SIGCHLD is ignored in this process, "
            "so the system discards its children's exit statuses (restore it with "
            "signal.signal(signal.SIGCHLD, signal.SIG_DFL) to learn the exit code or signal)",
            None,
            None,
        )
    if returncode < 0:
        signum = -returncode
        try:
            signame = signal.Signals(signum).name
        except ValueError:  # pragma: no cover
            signame = str(signum)
        return f"was killed by {signame} {when}", signum, None
    return f"exited with code {returncode} {when}", None, returncode


def _exit_status_discarded(proc: object) -> bool:
    """Whether the system reaps this process itself, keeping no exit status: a child of a
    process that ignores SIGCHLD (a fork server's workers are its children, not ours)."""
    if isinstance(proc, ForkServed):
        return False
    return signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN


def write_frame(fd: int, kind: int, job: int = 0, payload: bytes = b"") -> None:
    """A frame to a worker. Never raises SIGPIPE, even in a program that has restored its
    default action (CLI tools do): a dead worker is a BrokenPipeError, handled here."""
    if _signals.getsignal(signal.SIGPIPE) == signal.SIG_IGN:  # Python's default
        _wire.write_frame(fd, kind, job, payload)
        return
    pipe = {signal.SIGPIPE}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, pipe)
    try:
        _wire.write_frame(fd, kind, job, payload)
    except BrokenPipeError:
        # The SIGPIPE now pending for this thread: drop it (macOS has no sigtimedwait,
        # and sigwait returns at once for a signal that is pending).
        if hasattr(signal, "sigtimedwait"):
            signal.sigtimedwait(pipe, 0)
        elif signal.SIGPIPE in signal.sigpending():
            signal.sigwait(pipe)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _environ_snapshot() -> object:
    raw = getattr(os.environ, "_data", None)
    return None if raw is None else dict(raw)


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the directory was removed: there is nothing to follow
        return None


def _ready(fd: int, timeout: float = 0.0) -> bool:
    """Whether reading ``fd`` would not block (data, end of file, or a process descriptor
    whose process has exited), waiting up to ``timeout`` seconds. poll(), not select():
    select() cannot take a descriptor numbered 1024 or more, and a busy service's pipes
    may well be numbered so."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
