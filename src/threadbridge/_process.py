"""Pools of worker processes: which worker runs a job, which wait idle, which retire.

Each event loop has its own default pool (``backend="process"``); it shuts down when the
loop ends. A ``threadbridge.ProcessPool`` has one of its own, shaped by its arguments. A
standby worker is kept idle so that the call after a kill does not pay a cold start.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import signal
import subprocess
import threading
import time
import weakref

from . import _spawn, _stats
from ._errors import WorkerCrashed
from ._forkserver import ForkServed, ForkServer
from ._ladder import Run
from ._loop import Link
from ._process_worker import WorkerProcess, how_it_ended, worker_settings
from ._scheduler import SCHEDULER, Timer

logger = logging.getLogger("threadbridge")

Process = subprocess.Popen[bytes] | _spawn.Forked | ForkServed

# Idle workers beyond the one kept on standby exit after this many seconds. Starting a
# worker costs tens of milliseconds, so this errs on the side of keeping them.
IDLE_TIMEOUT = 60.0
# When a loop ends, its workers get this long to exit on their own before SIGKILL.
SHUTDOWN_GRACE = 1.0
# A standby wanted because a call took the last idle worker starts this much later: a
# starting interpreter competes for the CPUs with the very call that took the worker.
STANDBY_DELAY = 0.05
# Workers that end by themselves before their first job (they cannot start, or something
# kills them while idle) are replaced after a delay that doubles with each one in a row,
# from this, up to MAX_RESPAWN_DELAY: never a loop of interpreters started and lost.
RESPAWN_DELAY = 0.1
MAX_RESPAWN_DELAY = 30.0
# After this many workers in a row ended before they were ready, the pool is broken: its
# calls get the last one's error at once, instead of waiting for workers that never start.
MAX_FAILED_STARTS = 3


class WorkerPool:
    """The workers of one event loop (its default pool, or one ``ProcessPool``).

    A worker's ``state`` changes only in ``_set_state()``, under ``lock``; ``stats()``
    counts the states. idle -> busy -> idle (or retiring); busy -> dead at rung 3;
    anything -> gone once reaped (unreaped while a killed worker resists reaping).
    """

    def __init__(
        self,
        link: Link,
        *,
        idle_timeout: float | None = None,
        max_tasks: int | None = None,
        initializer: bytes | None = None,
        initializer_name: str = "",
        start_method: str | None = None,
    ) -> None:
        self.link = link
        self.idle_timeout = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.max_tasks = max_tasks  # a worker retires after this many jobs
        self.initializer = initializer  # a pickled job each worker runs first
        self.initializer_name = initializer_name
        self.early_ends = 0  # workers in a row that ended by themselves before a first job
        self.failed_starts = 0  # workers in a row that ended before they were ready
        self.start_method = start_method  # None: set_start_method()'s choice
        # The initializer failed: no worker of this pool runs anything any more.
        self.broken: BaseException | None = None
        self.broken_told = False  # the error itself went to a caller once
        self.forkserver: ForkServer | None = None  # for start method "forkserver"
        self.forkserver_lock = threading.Lock()
        self.lock = threading.Lock()
        self.workers: set[WorkerProcess] = set()
        self.idle: list[WorkerProcess] = []  # most recently used last
        self.closed = False
        self.loop_ending = True  # as the pool closes: set by shutdown()
        self.making_standby = False
        self.standby_made = threading.Condition(self.lock)
        self.retire_timer: Timer | None = None  # withdrawn at shutdown: it holds the pool
        self.standby_timer: Timer | None = None  # the same
        _all_pools.add(self)
        _stats.register(self)

    def _set_state(self, worker: WorkerProcess, state: str, *, front: bool = False) -> None:
        if worker.state == "idle":
            self.idle.remove(worker)
        if state == "idle":
            self.idle.insert(0, worker) if front else self.idle.append(worker)
        if state == "gone":
            self.workers.discard(worker)
        else:
            self.workers.add(worker)
        worker.state = state

    # --- taking and giving back workers --------------------------------------------------

    def acquire(self) -> WorkerProcess:
        with self.lock:
            self._check_broken()
            if self.closed:
                raise RuntimeError("the event loop is shutting down; no new process work")
            worker = None
            while self.idle:
                candidate = self.idle[-1]
                if candidate.finished or candidate.exited():
                    # Died while idle (OOM killer, a kill from outside), and its end of
                    # file not read yet (it would fail the call), or its end is under way.
                    self._set_state(candidate, "dead")
                    continue
                worker = candidate
                self._set_state(worker, "busy")
                break
            want_standby = not self.idle
        if worker is None:
            worker = self._new_worker("busy")
        worker.used = True
        if want_standby:
            with self.lock:
                if self.standby_timer is None and not self.closed:
                    # Held weakly: a pending standby must not keep an ended loop's pool.
                    due = functools.partial(_standby_due, weakref.ref(self))
                    self.standby_timer = SCHEDULER.call_later(STANDBY_DELAY, due)
        return worker

    def _check_broken(self) -> None:
        """Under the lock: a pool whose initializer failed runs nothing."""
        if self.broken is not None:
            raise self._broken_error()

    def _broken_error(self) -> BaseException:
        """Under the lock: what a call that meets the broken pool gets: the initializer's
        own error (with the worker's traceback) the first time, then a RuntimeError."""
        assert self.broken is not None
        if not self.broken_told:
            self.broken_told = True
            return self.broken
        if self.initializer is not None:
            why = (
                "this ProcessPool's initializer failed in a worker (see the error above), "
                "so the pool runs nothing; fix the initializer and make a new ProcessPool"
            )
        else:
            why = (
                f"{MAX_FAILED_STARTS} worker processes of this pool in a row ended before "
                "they could run anything (see the error above), so the pool starts no "
                "more; fix what stops them, then use a new pool (a new event loop for "
                'backend="process")'
            )
        error = RuntimeError(why)
        error.__cause__ = self.broken
        return error

    def init_failed(self, error: BaseException, *, for_job: bool) -> BaseException | None:
        """A worker's initializer raised: the pool is broken. Returns the error for the
        job that worker had, if ``for_job``."""
        with self.lock:
            if self.broken is None:
                self.broken = error
            return self._broken_error() if for_job else None

    # --- a fork server that is still starting ---------------------------------------------

    def not_ready(self) -> bool:
        """Whether a call would wait for this pool's fork server to import what workers
        need (the main script's import may take long): no idle worker to take it, and
        the server not ready. Cheap: every call of a process pool asks."""
        if self.idle:
            return False
        if (self.start_method or _spawn.current_method()) != "forkserver":
            return False
        server = self.forkserver
        return server is None or not server.ready

    async def ready(self) -> None:
        """Start the fork server if need be, and wait (in the loop, cancellably) until it
        is ready or has died."""
        import anyio

        server = self._forkserver()
        if server.ready:
            return
        ready = anyio.Event()
        server.when_ready(lambda: self.link.post(ready.set))
        await ready.wait()

    def _forkserver(self) -> ForkServer:
        with self.forkserver_lock:
            server = self.forkserver
            if server is None or not server.alive:
                if server is not None:
                    server.close()  # its socket, and it is reaped
                server = self.forkserver = ForkServer(worker_settings(warm=True))
            return server

    def start_process(self, job_r: int, control_r: int, result_w: int) -> Process:
        """Start a worker process the pool's way; it gets the three pipe ends."""
        method = self.start_method or _spawn.current_method()
        if method != "forkserver":
            return _spawn.start_worker(job_r, control_r, result_w, method)
        server = self._forkserver()
        try:
            return server.start_worker(job_r, control_r, result_w)
        except OSError:
            # Its socket failed (the server has died, or is dying), or nothing was left
            # to start a worker with (out of descriptors, say): which, its exit tells.
            if server.alive and server.exit_code() is None:
                raise
        # The server ended before it could start a worker: it cannot start (its main
        # script's import ended the process, an interpreter that cannot run...).
        how, signum, exitcode = how_it_ended(server.proc, server.exit_code(), "as it started")
        error = WorkerCrashed(
            f"the fork server of this pool (pid {server.proc.pid}) {how}, before it could "
            "start a worker: workers could not start (its standard error says why: an "
            "interpreter that cannot run, a main script whose import ends the process)",
            signal=signum,
            exitcode=exitcode,
            pid=server.proc.pid,
        )
        with self.lock:
            self._failed_start(error, told=True)
        raise error

    def _failed_start(self, error: BaseException, *, told: bool, at_once: bool = False) -> None:
        """Under the lock: a worker (or a fork server) ended before it was ready. The
        pool breaks at the MAX_FAILED_STARTS-th in a row, or ``at_once``; ``told``: a
        call has had this error."""
        self.failed_starts += 1
        if self.broken is None and (at_once or self.failed_starts >= MAX_FAILED_STARTS):
            self.broken = error
        if told and self.broken is not None:
            # A call has had an error of the kind that broke the pool (its own worker's,
            # which may have ended after an idle one): later calls get the RuntimeError
            # that says the pool runs nothing.
            self.broken_told = True

    def _new_worker(self, state: str) -> WorkerProcess:
        worker = WorkerProcess(self, self.link, standby=state == "idle")
        with self.lock:
            closed = self.closed
            self._set_state(worker, "retiring" if closed else state, front=True)
        if closed:
            # shutdown() did not see it: end it here, the same way. If its loop is ending,
            # it may run nothing more that is posted to it (so nothing is left to it); a
            # ProcessPool's block has ended, but its loop runs on and still watches the
            # worker's descriptors (its exit watcher may be waiting already): the loop
            # closes them, after it has stopped watching them.
            _end_workers([worker], loop_gone=self.loop_ending)
            raise RuntimeError("the event loop is shutting down; no new process work")
        return worker

    def _add_standby(self) -> None:
        with self.lock:
            if self.closed or self.idle or self.making_standby or self.broken is not None:
                return
            self.making_standby = True
        try:
            self._new_worker("idle")
        except RuntimeError:
            pass  # the loop ended meanwhile
        except WorkerCrashed:
            pass  # counted: the calls that meet the pool are told
        except OSError:  # pragma: no cover - out of processes or descriptors
            logger.exception("could not start a standby worker")
        finally:
            with self.lock:
                self.making_standby = False
                self.standby_made.notify_all()

    def returned(self, worker: WorkerProcess) -> None:
        """A worker answered its job and is free again (in the loop's thread)."""
        worker.idle_since = time.monotonic()
        worker.tasks += 1
        self.early_ends = 0
        with self.lock:
            retire = self.closed or (self.max_tasks is not None and worker.tasks >= self.max_tasks)
            self._set_state(worker, "retiring" if retire else "idle")
            if not retire and self.retire_timer is None and self.idle_timeout < math.inf:
                self.retire_timer = SCHEDULER.call_later(self.idle_timeout, self._retire_idle)
            replace = retire and not self.closed and not self.idle
        _stats.changed()
        if retire:
            worker.ask_to_exit()
        if replace:  # it did its max_tasks_per_worker jobs: a fresh one takes its place
            threading.Thread(
                target=self._add_standby, name="threadbridge-standby", daemon=True
            ).start()

    def _retire_idle(self) -> None:
        """Let workers idle for IDLE_TIMEOUT exit; the most recently used one stays."""
        now = time.monotonic()
        with self.lock:
            self.retire_timer = None
            if self.closed:
                return
            keep = self.idle[-1:]  # the standby
            timeout = self.idle_timeout
            old = [w for w in self.idle[:-1] if now - w.idle_since >= timeout]
            for worker in old:
                self._set_state(worker, "retiring")
            rest = [w for w in self.idle if w not in keep]
            if rest:
                delay = timeout - (now - min(w.idle_since for w in rest))
                self.retire_timer = SCHEDULER.call_later(max(delay, 0.0), self._retire_idle)
        for worker in old:
            worker.ask_to_exit()

    def booted(self) -> None:
        """A worker is ready for jobs (in the loop's thread)."""
        self.failed_starts = 0

    def ended(
        self,
        worker: WorkerProcess,
        *,
        reaped: bool,
        early: bool = False,
        boot_error: BaseException | None = None,
        told: bool = False,
    ) -> None:
        """A worker process has exited (and been reaped, or resists it). ``early``: by
        itself, before its first job; ``boot_error``: before it was even ready (``told``:
        the call it had gets that error)."""
        with self.lock:
            self._set_state(worker, "gone" if reaped else "unreaped")
            if boot_error is not None:
                at_once = worker.boot == "initializer"
                self._failed_start(boot_error, told=told, at_once=at_once)
            if early:
                self.early_ends += 1
            replace = not self.closed and not self.idle and self.broken is None
            delay = 0.0
            if replace and self.early_ends:
                delay = min(RESPAWN_DELAY * 2 ** (self.early_ends - 1), MAX_RESPAWN_DELAY)
                if self.standby_timer is None:
                    due = functools.partial(_standby_due, weakref.ref(self))
                    self.standby_timer = SCHEDULER.call_later(delay, due)
        _stats.changed()
        if replace and not delay:
            self._add_standby()

    def shutdown(self, *, loop_ending: bool = True) -> None:
        """End every worker: ask, wait up to SHUTDOWN_GRACE, then SIGKILL. Blocks.
        ``loop_ending``: its loop is ending too (not only a ProcessPool's block)."""
        with self.lock:
            self.loop_ending = loop_ending
            if self.closed:
                return
            self.closed = True
            timer, self.retire_timer = self.retire_timer, None
            standby, self.standby_timer = self.standby_timer, None
            # A standby being started now is ended by its own thread (it sees closed):
            # wait for it, so that nothing of the pool outlives its shutdown.
            self.standby_made.wait_for(lambda: not self.making_standby, timeout=10)
            workers = list(self.workers)
            for worker in workers:
                if worker.state == "idle":
                    self._set_state(worker, "retiring")
        for pending in (timer, standby):
            if pending is not None:
                pending.cancel()
        for worker in workers:
            # The loop will not read again (it is ending, or gone).
            worker.unwatch()
        _end_workers(workers)
        with self.forkserver_lock:
            server, self.forkserver = self.forkserver, None
        if server is not None:
            server.close()

    # --- stats ----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.lock:
            states = [w.state for w in self.workers]
            standby = sum(1 for w in self.idle if not w.used)
        return {
            "idle_workers": states.count("idle"),
            "busy_workers": states.count("busy"),
            "standby_workers": standby,
            "unreaped_workers": states.count("unreaped"),
        }

    def kept_processes(self) -> set[int]:
        """Its idle workers and its fork server, which it keeps for the next call."""
        with self.lock:
            kept = {w.pid for w in self.idle}
            server = self.forkserver
        if server is not None and server.alive:
            kept.add(server.proc.pid)
        return kept

    def running(self) -> list[Run]:
        """The runs its busy workers have."""
        with self.lock:
            works = [w.current for w in self.workers if w.state == "busy"]
        return [work.run for work in works if work is not None]

    def describe_running(self) -> list[str]:
        with self.lock:
            works = [w.current for w in self.workers if w.state == "busy"]
        return [work.describe() for work in works if work is not None]


def _standby_due(ref: weakref.ref[WorkerPool]) -> None:
    pool = ref()
    if pool is None:
        return
    with pool.lock:
        pool.standby_timer = None
        if pool.closed or pool.idle:
            # Quick calls one after another: the worker is back already, and no thread
            # is started just to find that out.
            return
    threading.Thread(target=pool._add_standby, name="threadbridge-standby", daemon=True).start()


def _end_workers(workers: list[WorkerProcess], *, loop_gone: bool = False) -> None:
    """The loop is ending (nothing reads answers any more): the busy workers' targets get
    rungs 1 and 2 at once, every worker is asked to exit, and what is left after the grace
    is killed, as rung 3. Each run then reports how it really ended."""
    for worker in workers:
        work = worker.current
        if work is not None:
            work.run.cancel()  # rung 1, and the ladder's own clock for what follows...
            work.interrupt()  # ...but rung 2 at once: the loop is going
        worker.ask_to_exit()
    deadline = time.monotonic() + SHUTDOWN_GRACE
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            work = worker.current
            if work is None or not worker.kill_for(work, later=True):
                worker.signal_group(signal.SIGKILL)
        worker.finish(drain=True, loop_gone=loop_gone)


_all_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_pools: weakref.WeakKeyDictionary[object, WorkerPool] = weakref.WeakKeyDictionary()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_all_pools):
        pool.shutdown()


def _forget_after_fork() -> None:
    """In a forked child: the parent's pools are not ours. Never end them (at exit or
    otherwise), and close our copies of their pipes, so that the parent's workers see end
    of file when the parent dies, whatever its children do."""
    for pool in list(_all_pools):
        for worker in list(pool.workers):
            worker.forget()
        if pool.forkserver is not None:
            pool.forkserver.forget()
        _stats.unregister(pool)
    _all_pools.clear()
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def pool_for(link: Link) -> WorkerPool:
    """The default pool of the running loop; made, with its shutdown hook, on first use."""
    key = link.key
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = WorkerPool(link)

        def close() -> None:
            # The pool refers to the loop (through its link): dropped from the registry,
            # it no longer keeps the ended loop alive.
            _pools.pop(key, None)
            pool.shutdown()

        link.on_close(close, "threadbridge process pool guard")
    return pool
