"""Pools of worker processes: which worker runs a job, which wait idle, which retire.

Each event loop has its own default pool (``backend="process"``); it shuts down when the
loop ends. A ``threadbridge.ProcessPool`` has one of its own, shaped by its arguments. A
standby worker is kept idle so that the call after a kill does not pay a cold start.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import weakref

from . import _locks, _stats
from ._errors import WorkerCrashed
from ._ladder import Run
from ._loop import Link
from ._scheduler import SCHEDULER, Timer
from ._worker_ends import end_workers
from ._worker_owner import Process
from ._worker_process import WorkerProcess
from ._worker_start import Starter

logger = logging.getLogger("threadbridge")

# Idle workers beyond the one kept on standby exit after this many seconds. Starting a
# worker costs tens of milliseconds, so this errs on the side of keeping them.
IDLE_TIMEOUT = 60.0
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
        # The initializer failed: no worker of this pool runs anything any more.
        self.broken: BaseException | None = None
        self.broken_told = False  # the error itself went to a caller once
        self.starter = Starter(start_method)
        self.lock = _locks.Lock()
        self.workers: set[WorkerProcess] = set()
        self.idle: list[WorkerProcess] = []  # most recently used last
        self.closed = False
        self.loop_ending = True  # as the pool closes: set by shutdown()
        self.making_standby = False
        # Waited on and notified under `with self.lock:`, never entered itself: `with` on a
        # threading.Condition can leave its lock held (see _locks).
        self.standby_made = threading.Condition(self.lock)
        self.retire_timer: Timer | None = None  # withdrawn at shutdown: it holds the pool
        self.standby_timer: Timer | None = None  # the same
        # A call started a worker of its own (none was idle): the standby comes once that
        # worker is ready, not while both interpreters would start at once.
        self.standby_after_boot = False
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
        cold = worker is None
        if worker is None:
            worker = self._new_worker("busy")
        worker.used = True
        if want_standby:
            with self.lock:
                if cold:
                    self.standby_after_boot = True  # see booted()
                elif self.standby_timer is None and not self.closed:
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

    # --- starting workers ---------------------------------------------------------------

    def not_ready(self) -> bool:
        """Whether a call would wait for this pool's fork server to import what workers
        need: no idle worker to take it, and the server not ready. Cheap: every call of
        a process pool asks."""
        return not self.idle and self.starter.not_ready()

    async def ready(self) -> None:
        await self.starter.ready(self.link)

    def start_process(self, job_r: int, control_r: int, result_w: int) -> Process:
        """Start a worker process the pool's way; it gets the three pipe ends."""
        try:
            return self.starter.start(job_r, control_r, result_w)
        except WorkerCrashed as error:  # its fork server ended before it could start one
            with self.lock:
                self._failed_start(error, told=True)
            raise

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
            end_workers([worker], loop_gone=self.loop_ending)
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
            _start_standby(self)

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
        with self.lock:
            if not self.standby_after_boot:
                return
            # The call that started it runs now; the standby starts a little later, as
            # for a call that took the last idle worker (see acquire()).
            self.standby_after_boot = False
            if self.standby_timer is None and not self.closed:
                due = functools.partial(_standby_due, weakref.ref(self))
                self.standby_timer = SCHEDULER.call_later(STANDBY_DELAY, due)

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
            work = worker.current
            if loop_ending and work is not None:
                _stats.note_outlived(f"{work.describe()}: still running when its event loop ended")
        end_workers(workers)
        self.starter.close()

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
        server = self.starter.kept()
        if server is not None:
            kept.add(server)
        return kept

    def runs(self) -> list[Run]:
        """The runs its busy workers have."""
        with self.lock:
            works = [w.current for w in self.workers if w.state == "busy"]
        return [work.run for work in works if work is not None]

    def running(self) -> list[_stats.RunningTarget]:
        with self.lock:
            busy = [(w, w.current) for w in self.workers if w.state == "busy"]
        return [
            _stats.RunningTarget(
                work.run,
                "process",
                work.started,
                worker.pid,
                None,
                functools.partial(worker.where_of, work),
                work.describe(),
            )
            for worker, work in busy
            if work is not None
        ]


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
    _start_standby(pool)


def _start_standby(pool: WorkerPool) -> None:
    try:
        threading.Thread(target=pool._add_standby, name="threadbridge-standby", daemon=True).start()
    except RuntimeError:
        # The interpreter is exiting (3.12 refuses new threads from then on): a standby
        # would serve no later call. (A thread that cannot start for want of resources
        # raises RuntimeError too: the next call starts its worker itself.)
        logger.debug("threadbridge: no standby worker (no thread could start)", exc_info=True)
