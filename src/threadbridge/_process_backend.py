"""The process backends: ``backend="process"`` (the event loop's default pool) and
``threadbridge.ProcessPool`` (a pool shaped by its arguments), and the rungs for a
process: rung 2 is SIGTERM, rung 3 SIGKILL, both to the worker's process group."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from . import _jobs, _settings, _spawn, _wire
from ._backend import Backend
from ._callables import check_func, name_of
from ._cpus import usable_cpus
from ._errors import WorkerCrashed
from ._ladder import Ending, Run
from ._loop import Link, current_link
from ._loop._waits import shielded, shielded_in_thread
from ._pickling import Answer
from ._pools import pool_for, track
from ._public import export
from ._worker_io import how_it_ended
from ._worker_pool import WorkerPool
from ._worker_process import WorkerProcess

logger = logging.getLogger("threadbridge")

_job_ids = itertools.count(1)


class ProcessWork:
    """One target in one worker process; the ladder's Work for the process backend."""

    __slots__ = ("interrupt_sent", "job_id", "run", "started", "worker")

    def __init__(self, run: Run, worker: WorkerProcess) -> None:
        self.run = run
        self.worker = worker
        self.job_id = next(_job_ids)
        self.interrupt_sent = False
        self.started = time.monotonic()  # sent to the worker now

    # --- the rungs, called by the ladder ---------------------------------------------

    def request_stop(self) -> None:
        self.worker.control(_wire.STOP, self.job_id)

    def interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        worker = self.worker
        with worker.lock:
            if worker.current is not self:
                return False
            self.interrupt_sent = True
        if announce is not None:
            announce()
        worker.control(_wire.INTERRUPT, self.job_id)
        return True

    def force(self) -> None:
        self.worker.kill_for(self, self._say_killed)

    def _say_killed(self) -> None:
        # Said before the kill: the kill's report may come at once from the loop.
        logger.warning(
            "killed the %s and its process group (rung 3): it did not stop within its "
            "grace periods%s",
            self.describe(),
            self.run.said_where(),
            extra=self.run.fields("kill", self),
        )

    backend = "process"  # for the records of the ladder (Run.fields)

    @property
    def pid(self) -> int:
        return self.worker.pid

    def describe(self) -> str:
        return f"worker process {self.worker.pid} running {self.run.name}"

    # --- from the worker -------------------------------------------------------------

    def answered(self, answer: Answer, *, hand_back: bool = True) -> None:
        self.run.report_answer(answer, hand_back=hand_back)

    def killed(self) -> None:
        self.run.report(Ending.KILLED)

    def crashed(
        self,
        returncode: int | None,
        *,
        pipe_closed: bool = False,
        error: WorkerCrashed | None = None,
    ) -> None:
        """The worker died without answering; ``error`` says why, if the pool knows
        better than its exit (it died while starting)."""
        if error is None:
            error = self._crash_error(returncode, pipe_closed)
        self.run.report(Ending.ENDED, (False, error), interrupted=self.interrupt_sent)

    def _crash_error(self, returncode: int | None, pipe_closed: bool) -> WorkerCrashed:
        worker = f"the worker process (pid {self.worker.pid}) running {self.run.name}"
        pid = self.worker.pid
        if pipe_closed or returncode == _wire.PIPES_LOST:
            how = "was killed" if pipe_closed else f"exited with code {returncode}"
            return WorkerCrashed(
                f"{worker} {how} without answering: its pipes to this process were closed "
                "or replaced while it ran. The target closed or replaced file descriptors "
                "that it did not open (os.closerange(), os.dup2(), a library that "
                "daemonizes the process?); a process target must close only those it "
                "opened",
                signal=-returncode if returncode is not None and returncode < 0 else None,
                exitcode=returncode if returncode is not None and returncode >= 0 else None,
                pid=pid,
            )
        how, signum, exitcode = how_it_ended(self.worker.proc, returncode)
        return WorkerCrashed(f"{worker} {how}", signal=signum, exitcode=exitcode, pid=pid)


def available() -> bool:
    """Whether this platform has what the process backend needs (Windows has not)."""
    return sys.platform != "win32" and hasattr(os, "killpg")


def _check_platform(what: str) -> None:
    if not available():
        raise NotImplementedError(
            f'{what}: backend="process" needs process groups and POSIX signals, which '
            'this platform lacks (Windows has neither); use backend="thread" there'
        )
    if _settings.importing_main:
        raise RuntimeError(
            f"{what}: this is a worker process importing the main script (as "
            "__mp_main__, so that the functions defined in it can run in workers), and "
            "the script started process work while being imported. Put the script's "
            'entry point under `if __name__ == "__main__":`'
        )


def _start(pool: WorkerPool, run: Run, job: bytes) -> ProcessWork:
    while True:
        worker = pool.acquire()
        work = ProcessWork(run, worker)
        if worker.take(work):
            break
        # An idle worker that died just now, its death not yet visible from outside (a
        # fork server's worker, macOS): its own end tells the pool. A new worker is
        # always free, so this ends.
    run.attach(work)  # before the job goes: from here the ladder can reach it
    worker.send(work, job)
    return work


class ProcessBackend(Backend):
    """``backend="process"``: the running event loop's default pool of workers."""

    name = "process"

    def check_platform(self, what: str) -> None:
        _check_platform(what)

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
        return _jobs.dumps_job(func, args, name)

    def start(self, run: Run, job: Any) -> ProcessWork:
        return _start(pool_for(run.link), run, job)

    may_wait_to_start = True

    def not_ready(self, link: Link) -> bool:
        # The default pool forks from a server only under set_start_method("forkserver"):
        # otherwise no call looks the pool up twice.
        return _spawn.current_method() == "forkserver" and pool_for(link).not_ready()

    async def ready(self, link: Link) -> None:
        await pool_for(link).ready()

    def default_limit(self) -> int:
        return usable_cpus()


def default_backend() -> ProcessBackend:
    return ProcessBackend()


def _positive_int_or_none(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ProcessPool: {what} must be a positive int or None, got {value!r}")
    return value


class ProcessPool(Backend):
    """A pool of worker processes of your own, shaped by its arguments.

    Use it inside ``async with``, and pass it as the backend of the calls that should run
    in it. ``backend="process"`` goes on using the event loop's default pool.

        async with threadbridge.ProcessPool(2, initializer=load_model) as pool:
            result = await threadbridge.run_killable(predict, data, backend=pool)

    Leaving the ``async with`` block cancels the pool's calls still running (each
    climbs its ladder), waits for them, then stops its workers: asked to exit, given a
    second, killed, reaped. Using the pool before or after its block, or from another
    event loop, is a ``RuntimeError``.

    Args:
        workers: how many of its calls may run at once (the default limiter of calls
            that name this pool; a ``limiter=`` given to a call takes its place). None:
            one per CPU.
        initializer: called as ``initializer(*initargs)`` in each worker before its
            first call. If it raises, the call that started the worker gets that error
            (as itself, with the worker's traceback), the pool starts no more workers,
            and every later call gets a ``RuntimeError`` that says so.
        initargs: arguments for ``initializer``.
        max_tasks_per_worker: a worker exits after this many calls and a fresh one takes
            its place (for libraries that leak memory). None: no limit.
        idle_timeout: seconds after which idle workers exit (one stays ready on standby).
            None: never.
        start_method: ``"spawn"``, ``"fork"`` or ``"forkserver"`` (see
            ``set_start_method()``). None: the method ``set_start_method()`` chose.

    Raises:
        ValueError: an argument out of range.
        TypeError: ``initializer`` is not a plain callable, or it or ``initargs`` cannot
            be pickled.
    """

    name = "ProcessPool"

    def __init__(
        self,
        workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_worker: int | None = None,
        idle_timeout: float | None = 60.0,
        start_method: str | None = None,
    ) -> None:
        self._workers = _positive_int_or_none(workers, "workers") or usable_cpus()
        self._max_tasks = _positive_int_or_none(max_tasks_per_worker, "max_tasks_per_worker")
        if idle_timeout is None:
            idle_timeout = math.inf
        elif isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float)):
            raise ValueError(f"ProcessPool: idle_timeout must be seconds or None: {idle_timeout!r}")
        elif not idle_timeout >= 0:
            raise ValueError(f"ProcessPool: idle_timeout must be >= 0: {idle_timeout!r}")
        self._idle_timeout = float(idle_timeout)
        if start_method is not None:
            _spawn.check_start_method(start_method)
        self._start_method = start_method
        self._initializer: bytes | None = None
        self._initializer_name = ""
        if initializer is not None:
            check_func(initializer, "ProcessPool(initializer=...)")
            args = tuple(initargs)
            name = self._initializer_name = name_of(initializer)
            self._initializer = _jobs.dumps_job(initializer, args, f"the initializer {name}")
        self._pool: WorkerPool | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._pool else "not entered"
        return f"<threadbridge.ProcessPool workers={self._workers} {state}>"

    async def __aenter__(self) -> ProcessPool:
        if self._pool is not None or self._closed:
            raise RuntimeError("a ProcessPool can be entered once; make a new one")
        link = current_link("async with ProcessPool()")
        _check_platform("ProcessPool")
        pool = self._pool = track(
            WorkerPool(
                link,
                idle_timeout=self._idle_timeout,
                max_tasks=self._max_tasks,
                initializer=self._initializer,
                initializer_name=self._initializer_name,
                start_method=self._start_method,
            )
        )
        ref = weakref.ref(pool)

        def loop_closing() -> None:  # the loop ended inside the block: end the workers
            alive = ref()
            if alive is not None:
                alive.shutdown()

        link.on_close(loop_closing, "threadbridge ProcessPool guard")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool = self._pool
        self._closed = True
        if pool is None:
            return
        runs = pool.runs()
        for run in runs:
            run.cancel()

        async def settle() -> None:
            for run in runs:
                await run.link.wait_settled(run)

        await shielded(settle)
        await shielded_in_thread(functools.partial(pool.shutdown, loop_ending=False))

    # --- the Backend contract ------------------------------------------------------------

    def check_platform(self, what: str) -> None:
        """Also checks that the pool is open, and belongs to the running loop."""
        _check_platform(what)
        self._check_open(what)
        if self._pool is None:
            raise RuntimeError(
                f"{what}: use a ProcessPool inside its block: "
                "`async with threadbridge.ProcessPool(...) as pool:`"
            )
        if not self._pool.link.is_current():
            raise RuntimeError(f"{what}: this ProcessPool belongs to another event loop")

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
        return _jobs.dumps_job(func, args, name)

    def start(self, run: Run, job: Any) -> ProcessWork:
        # Checked again: a call that waited for its limiter may start after the block.
        self._check_open(run.name)
        assert self._pool is not None  # check_platform() ran first
        return _start(self._pool, run, job)

    may_wait_to_start = True

    def not_ready(self, link: Link) -> bool:
        pool = self._pool
        return pool is not None and pool.not_ready()

    async def ready(self, link: Link) -> None:
        if self._pool is not None:
            await self._pool.ready()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{what}: this ProcessPool's `async with` block has ended and its workers "
                "are gone; make a new ProcessPool"
            )

    def default_limit(self) -> int:
        return self._workers


export(ProcessPool)
