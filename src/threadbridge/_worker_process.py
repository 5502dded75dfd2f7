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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from . import _jobs, _locks, _otel, _pickling, _settings, _wire
from ._forkserver import ForkServed
from ._loop import Link
from ._pickling import Answer, How
from ._scheduler import SCHEDULER
from ._worker_io import close, ready, startup_error
from ._worker_owner import Job, Owner
from ._worker_pipes import WorkerPipes

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
# How long RunningTarget.where() waits for a worker to say where its target is. Its
# control thread answers at once, unless the target holds the GIL (one long C call).
WHERE_TIMEOUT = 1.0
# How long rung 3 waits for a worker to say where its target is before the kill, when
# rung 2 has not said it (Policy(interrupt=False), or a target rung 2 did not reach). It
# answers within moments, unless its target holds the GIL in one long C call.
ASK_BEFORE_KILL = 0.2


class _Asked:
    """One where() call waiting for the worker's answer."""

    __slots__ = ("stack", "told")

    def __init__(self) -> None:
        self.told = threading.Event()
        self.stack: str | None = None


class WorkerProcess:
    """One worker process and the pipes to it. ``state`` belongs to its pool."""

    def __init__(self, pool: Owner[WorkerProcess], link: Link, *, standby: bool = False) -> None:
        self.pool = pool
        self.link = link
        self.lock = _locks.Lock()  # guards current, killed, finished
        self.current: Job | None = None  # the job it runs
        self.killed: Job | None = None  # the job rung 3 killed it for
        # The job rung 3 is about to kill it for, once the worker has said where its
        # target is (see kill_for()), and what to say as it kills.
        self.killing: tuple[Job, Callable[[], None]] | None = None
        # A job that rung 2 reached, answered; reported once the worker is retired.
        self.answered: tuple[Job, Answer] | None = None
        self.finished = False
        self.ended = threading.Event()  # finish() has reported the job it had, if any
        self.fds_closed = False  # loop thread only: the result pipe and pidfd are closed
        self.state = "new"  # the pool's: idle, busy, retiring, dead, unreaped, gone
        self.used = False
        self.tasks = 0  # jobs answered
        # How far its boot has come: "starting", "initializer" (the pool's initializer
        # runs), "ready" (jobs may come). One that ends before "ready" failed to start.
        self.boot = "starting"
        self.idle_since = time.monotonic()
        self.parser = _wire.FrameParser()
        # where() calls waiting for the worker to say where a job's target is, by job id.
        self.asked: dict[int, list[_Asked]] = {}
        fds: list[int] = []
        try:
            for _ in range(3):  # out of descriptors (EMFILE) half-way: nothing stays open
                fds += os.pipe()
            job_r, job_w, control_r, control_w, self.result_fd, result_w = fds
            self.proc = pool.start_process(job_r, control_r, result_w)
        except BaseException:
            for fd in fds:
                close(fd)
            raise
        for fd in (job_r, control_r, result_w):  # the worker's ends
            close(fd)
        self.pipes = WorkerPipes(job_w, control_w)
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
        settings = _settings.collect(warm=standby)
        forked_by_server = isinstance(self.proc, ForkServed)
        self.heard = _settings.Follower(settings, inherited_environ=not forked_by_server)
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
        self.pipes.write(_wire.INIT, 0, pickle.dumps(settings))

    # --- talking to the worker ---------------------------------------------------------

    def take(self, work: Job) -> bool:
        """``work`` is this worker's job now (sent next, by ``send()``). False if the
        worker's end is being handled already: that took no job into account, and this
        one would never be reported."""
        changed = self.heard.changes()
        if changed or (not self.has_authkey and "multiprocessing" in sys.modules):
            self._send_settings(changed)
        with self.lock:
            if self.finished:
                return False
            self.current = work
        return True

    def send(self, work: Job, payload: bytes) -> None:
        span = work.run.span
        if span is not None:  # the program traces: the job's context goes first
            found = _otel.carrier(span)
            if found is not None:
                self.pipes.write(_wire.TRACE, work.job_id, pickle.dumps(found))
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
        self.pipes.write(_wire.RUN, job_id, payload)

    def where_of(self, work: Job, timeout: float = WHERE_TIMEOUT) -> str:
        """``RunningTarget.where()`` of a job of this worker: asked of its control thread."""
        if self.link.is_current():
            return (
                "(where() waits for the worker's answer, which this event loop reads: "
                "call it from another thread, e.g. anyio.to_thread.run_sync(target.where))"
            )
        asked = _Asked()
        with self.lock:
            if self.current is not work or self.finished:
                return "(not running: it has ended)"
            self.asked.setdefault(work.job_id, []).append(asked)
        try:
            self.control(_wire.ASK_WHERE, work.job_id)
        except OSError:
            return "(not running: its worker has ended)"
        if not asked.told.wait(timeout):
            with self.lock:
                waiting = self.asked.get(work.job_id, [])
                if asked in waiting:
                    waiting.remove(asked)
            return (
                f"(the worker did not say within {timeout}s: its target may hold the GIL "
                "in one long C call)"
            )
        return asked.stack or "(not running, or no frames of its own right now)"

    def _tell_asked(self, job_id: int | None, stack: str | None) -> None:
        """Answer the where() calls waiting for ``job_id`` (None: all of them)."""
        with self.lock:
            if job_id is None:
                waiting = [a for asked in self.asked.values() for a in asked]
                self.asked.clear()
            else:
                waiting = self.asked.pop(job_id, [])
        for asked in waiting:
            asked.stack = stack
            asked.told.set()

    def control(self, kind: int, job_id: int) -> None:
        self.pipes.write(kind, job_id, control=True)

    def ask_to_exit(self) -> None:
        self.pipes.write(_wire.EXIT)

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def forget(self) -> None:
        """In a forked child of the parent: close this copy of the parent's pipes. Only
        those still open in the parent: the number of one it has closed may be in use
        again by now, for the pipes of the very worker this child is about to become."""
        self.pipes.forget()
        if not self.fds_closed:
            for fd in (self.result_fd, self.pidfd):
                if fd is not None and fd >= 0:
                    close(fd)

    def exited(self) -> bool:
        """Whether the worker process has ended, without reaping it (lock-free)."""
        if isinstance(self.proc, ForkServed):
            # Not our child: its server tells, a moment after the exit. The process's own
            # descriptor (Linux) tells at once. (Its number is ours while fds_closed is
            # unset: only the loop's thread, which calls this, sets it.)
            if self.proc.exited():
                return True
            return self.pidfd is not None and not self.fds_closed and ready(self.pidfd)
        if not hasattr(os, "waitid"):
            # macOS before Python 3.13 cannot look without reaping: a worker that died
            # while idle is found out by the call it is given (WorkerCrashed).
            return False
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:
            return True  # reaped already

    def kill_for(self, work: Job, announce: Callable[[], None]) -> None:
        """Rung 3: SIGKILL the process group if it still runs ``work``; ``announce`` is
        called first (whatever it says comes before the kill can be seen: the exit is
        watched in the loop). Reaping and the report follow in ``finish()``, in a thread
        of its own. Returns at once.

        If rung 2 has not said where the target is, the worker is asked first: the kill
        follows its answer, or ``ASK_BEFORE_KILL`` seconds if none comes."""
        if work.run.where is None:
            with self.lock:
                if self.current is not work:
                    return  # it has just answered: that answer is reported
                self.killing = (work, announce)
            try:
                self.control(_wire.SAY_WHERE, work.job_id)
            except OSError:
                pass  # the worker is going: kill what is left of it now
            else:
                SCHEDULER.call_later(ASK_BEFORE_KILL, lambda: self._kill(work, announce))
                return
        self._kill(work, announce)

    def _kill(self, work: Job, announce: Callable[[], None]) -> None:
        with self.lock:
            killing = self.killing
            if killing is not None and killing[0] is work:
                self.killing = None
            if self.current is not work:
                return  # answered, or killed already (the answer or the timer came first)
            self.current = None
            self.killed = work
        announce()
        self.signal_group(signal.SIGKILL)
        self.finish_soon()

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
        while ready(self.result_fd) and self._on_readable():
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
        close(self.result_fd)
        if self.pidfd is not None:
            close(self.pidfd)

    def _seen(self, job_id: int, payload: bytes) -> None:
        """The worker says where the job's target was as rung 2 fired, or is as rung 3
        asked (then the kill follows)."""
        work = self.current
        if work is None or work.job_id != job_id:
            return
        killing = self.killing
        if killing is not None and killing[0] is not work:
            killing = None
        try:
            where = pickle.loads(payload)
            if where is not None:
                line, stack = where
                line, stack = str(line), str(stack)
        except Exception:  # plain strings; a worker that sends else is not ours to trust
            logger.debug("%s: could not load where it was", work.run.name, exc_info=True)
            where = None
        if killing is None:
            if where is not None:
                work.run.seen_late(line, stack)
            return
        if where is not None and work.run.where is None:
            work.run.seen_at(line, stack)  # said by rung 3's record
        self._kill(*killing)

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
            if kind != _wire.ANSWER:  # the others come once in a worker's life, or never
                if kind == _wire.NAMES:
                    source, names = pickle.loads(payload)
                    _jobs.set_main_names(tuple(source), frozenset(names))
                elif kind == _wire.INITIALIZING:
                    self.boot = "initializer"
                elif kind == _wire.READY:
                    self.boot = "ready"
                    self.pool.booted()
                elif kind == _wire.INIT_FAILED:
                    self._init_failed(payload)
                    return False
                elif kind == _wire.WHERE:
                    self._seen(job_id, payload)
                elif kind == _wire.HERE:
                    try:
                        stack = pickle.loads(payload)
                    except Exception:
                        stack = None
                    self._tell_asked(job_id, stack if isinstance(stack, str) else None)
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
                retire = answer.interrupted or work.interrupt_sent
                if retire:
                    self.answered = (work, answer)
            if retire:
                self.signal_group(signal.SIGKILL)
                self.finish_soon()
                return False
            self.pool.returned(self)
            work.answered(answer, hand_back=False)
            # Whoever awaits the value may drop it at once, and expect it gone: this
            # thread lets go of the answer before waking them.
            del answer
            work.run.hand_back()
        return True

    def _init_failed(self, payload: bytes) -> None:
        """The pool's initializer raised in this worker: the pool is broken, this worker
        goes, and the job it had gets the error."""
        error = _pickling.loads_answer(payload, "the ProcessPool's initializer").value
        with self.lock:
            work, self.current = self.current, None
        told = self.pool.init_failed(error, for_job=work is not None)
        self.signal_group(signal.SIGKILL)
        self.finish_soon()
        if work is not None:
            work.answered(Answer(How.RAISED, told))

    # --- the end ------------------------------------------------------------------------

    def _reap(self, timeout: float | None) -> int | None:
        # Woken the moment the process exits: a wait with a timeout would otherwise poll
        # (subprocess sleeps 1, 2, 4... ms between looks), and every cancel that ends in a
        # kill would wait for the next look. A fork server's worker is not our child: its
        # server tells when it exits.
        pidfd = None if isinstance(self.proc, ForkServed) else self.pidfd
        if timeout is not None and pidfd is not None and not ready(pidfd, timeout):
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _drain(self, work: Job) -> Answer | None:
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
        try:
            threading.Thread(target=self.finish, name="threadbridge-reap", daemon=True).start()
        except RuntimeError:
            # No thread can start (the interpreter is exiting, on 3.12 and later): reaped
            # here, then, within its bound; its call must still settle.
            self.finish()

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
        self._tell_asked(None, "(not running: its worker has ended)")
        # End of file on its answers while the worker still runs: something in it closed
        # or replaced its answer pipe. A dying worker's descriptors close a moment before
        # it is gone: it is given that moment. Told only where its exit can be awaited
        # without reaping it (pidfd, Linux): the group must be killed before the reap.
        pipe_closed = (
            crashed is not None
            and not drain
            and self.pidfd is not None
            and not ready(self.pidfd, PIPE_CLOSED_GRACE)
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
        self.pipes.end()
        # The loop may still watch the result pipe: only the loop's thread may stop that
        # and close it, or a new pipe given the same number would meet the old watch.
        if loop_gone or not self.link.call(self._close_result_fd):
            self.fds_closed = True  # the loop has ended (or is ending): nothing watches
            close(self.result_fd)
            if self.pidfd is not None:
                close(self.pidfd)
        # Ended by itself, not by the pool (rung 3, a kill after rung 2, asked to exit)?
        by_itself = killed is None and answered is None and self.state != "retiring"
        boot_error = None
        if by_itself and self.boot != "ready" and not self.pool.closed:
            then = f"before it could run {crashed.run.name}" if crashed else "while idle"
            initializer = self.pool.initializer_name if self.boot == "initializer" else None
            boot_error = startup_error(self.proc, returncode, then, initializer)
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
            answered[0].answered(answered[1])
        if crashed is not None:
            crashed.crashed(returncode, pipe_closed=pipe_closed, error=boot_error)
        self.ended.set()
        if returncode is None:
            self._reap(None)
            self.pool.ended(self, reaped=True)
