"""The thread backend: a process-wide pool of reusable daemon threads, and the rungs for a
thread (rung 2 injects ``TargetCancelled``; rung 3 abandons the thread)."""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from . import _inject, _stats
from ._backend import Backend
from ._ladder import Ending, Run
from ._target import Outcome, TargetState
from ._token import Token

logger = logging.getLogger("threadbridge")

# anyio's figure for its default thread limiter, which in turn is trio's, which says it
# was pulled out of the air. Threads are cheap; 40 keeps a runaway caller from making
# thousands of them.
DEFAULT_THREAD_LIMIT = 40

# Idle pool threads retire after this many seconds without work. anyio uses 10 s too;
# long enough that a bursty service keeps its threads, short enough not to hoard them.
IDLE_TIMEOUT = 10.0


class ThreadPool:
    """Daemon threads shared by every event loop in the process.

    Work waits in one queue. Idle threads block on it; a thread that finishes a run takes
    the next piece of work without going to sleep, which keeps throughput up when many
    callers hammer the pool. Work always goes through the queue, even to a new thread,
    so that no thread holds on to the work it was started for. The counts below, under
    ``lock``, are what ``stats()`` reports for threads.
    """

    def __init__(self) -> None:
        self._reset()
        _stats.register(self)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """Empty; also in a forked child, which has none of the parent's threads."""
        self.lock = threading.Lock()
        self.queue: queue.SimpleQueue[ThreadWork] = queue.SimpleQueue()
        self.idle = 0  # threads waiting on the queue, not yet claimed by a submit()
        self.busy: dict[int, ThreadWork] = {}  # id(work) -> work, queued or running
        self.abandoned: dict[int, ThreadWork] = {}  # given up on at rung 3, still running

    def submit(self, work: ThreadWork) -> None:
        """Run ``work`` on an idle pool thread, or on a new one."""
        key = id(work)
        with self.lock:
            reuse = self.idle > 0
            if reuse:
                self.idle -= 1  # claimed: it will not retire while the work waits
            self.busy[key] = work
        if not reuse:
            try:
                threading.Thread(target=self._main, name="threadbridge-worker", daemon=True).start()
            except BaseException:
                with self.lock:
                    del self.busy[key]
                _stats.changed()
                raise
        self.queue.put(work)

    def _main(self) -> None:
        get = self.queue.get
        while True:
            try:
                work = get(timeout=IDLE_TIMEOUT)
            except queue.Empty:
                with self.lock:
                    # Retire only if no submit() has claimed this thread meanwhile.
                    if self.idle > 0 and self.queue.empty():
                        self.idle -= 1
                        return
                continue
            reusable = work.run()
            del work  # nothing of a finished call stays reachable from an idle thread
            if not reusable:
                return

    def finished(self, work: ThreadWork, *, abandoned: bool) -> None:
        """Count out a work whose thread is done with it (and free, unless abandoned)."""
        with self.lock:
            if abandoned:
                del self.abandoned[id(work)]
            else:
                del self.busy[id(work)]
                self.idle += 1
        _stats.changed()

    def abandon(self, work: ThreadWork) -> bool:
        """Rung 3: give up on a running target. Whether it was still running."""
        with self.lock:
            if not work.state.abandon():
                return False
            self.abandoned[id(work)] = self.busy.pop(id(work))
            return True

    # --- stats ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {
                "idle_threads": self.idle,
                "busy_threads": len(self.busy),
                "abandoned_threads": len(self.abandoned),
            }

    def describe_running(self) -> list[str]:
        with self.lock:
            busy = list(self.busy.values())
            abandoned = list(self.abandoned.values())
        return [w.describe() for w in busy] + [
            f"abandoned thread still running {w.run_.name}" for w in abandoned
        ]


class ThreadWork:
    """One target on one pool thread; the ladder's Work for the thread backend."""

    __slots__ = ("args", "context", "func", "pool", "run_", "state", "taken", "withdrawn")

    def __init__(
        self, pool: ThreadPool, run: Run, func: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        self.pool = pool
        self.run_ = run
        self.func = func
        self.args = args
        self.context = context = contextvars.copy_context()
        sniffio = sys.modules.get("sniffio")
        if sniffio is not None:
            # The target runs in no event loop, whatever the caller's context says: as in
            # anyio's and trio's worker threads, so that sniffio answers "none" and
            # anyio.run() / trio.run() work inside the target.
            context.run(sniffio.current_async_library_cvar.set, None)
        self.state = TargetState(Token(), threading.Lock())
        self.state.portal = run.link
        # Under state.lock: a pool thread took it, or start() withdrew it (submitting it
        # was interrupted): whichever comes first reports its end, the other never does.
        self.taken = False
        self.withdrawn = False

    # --- the rungs, called by the ladder ---------------------------------------------

    def request_stop(self) -> None:
        self.state.token._set()

    def interrupt(self) -> bool:
        if not _inject.CAN_INJECT:
            logger.info(
                "%s: rung 2 is not available on this interpreter "
                "(no PyThreadState_SetAsyncExc); going on to rung 3",
                self.describe(),
            )
            return False
        return self.state.request_interrupt()

    def force(self) -> None:
        if not self.pool.abandon(self):
            return  # it has ended, or has not started (its token stops it): run() reports
        logger.warning(
            "abandoning the %s (rung 3): it did not stop within its grace periods and is "
            "left running as a daemon; its result will be discarded",
            self.describe(),
        )
        self.run_.report(Ending.ABANDONED, release=False)

    def describe(self) -> str:
        return f"thread running {self.run_.name}"

    # --- in the pool thread ----------------------------------------------------------

    def withdraw(self) -> None:
        """Submitting it was interrupted (a KeyboardInterrupt, a thread that could not
        start): unless a pool thread has taken it already, it never runs."""
        with self.state.lock:
            if self.taken:
                return  # that thread reports
            self.withdrawn = True
        self.run_.report(Ending.NOT_STARTED)

    def run(self) -> bool:
        """Run the target and report how it ended; return whether the thread may be reused."""
        state = self.state
        with state.lock:
            withdrawn = self.withdrawn
            self.taken = not withdrawn
        if withdrawn:
            self.pool.finished(self, abandoned=False)
            return True
        outcome = state.run(self._call)
        run = self.run_
        if state.abandoned:
            # Counted out first: whoever sees the limiter token come back must also see
            # stats() without this thread.
            self.pool.finished(self, abandoned=True)
            run.release()
            return False
        self.pool.finished(self, abandoned=False)
        if outcome is None:
            run.report(Ending.NOT_STARTED)
        else:
            run.report(Ending.ENDED, outcome, interrupted=state.interrupted)
        return True

    def _call(self) -> Outcome:
        try:
            result = self.context.run(self.func, *self.args)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(
                    f"threadbridge expected a sync function, but {self.run_.name} returned "
                    "a coroutine; await it in the event loop instead of running it in a thread"
                )
            return (True, result)
        except BaseException as exc:
            return (False, exc)


class ThreadBackend(Backend):
    """``backend="thread"``: the process-wide pool of daemon threads."""

    name = "thread"

    def __init__(self) -> None:
        self.pool = ThreadPool()

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> object:
        return (func, args)

    def start(self, run: Run, job: Any) -> ThreadWork:
        func, args = job
        work = ThreadWork(self.pool, run, func, args)
        run.attach(work)  # before a thread can take it: from here the ladder reaches it
        try:
            self.pool.submit(work)
        except BaseException:
            work.withdraw()
            raise
        return work

    def default_limit(self) -> int:
        return DEFAULT_THREAD_LIMIT


_backend: ThreadBackend | None = None


def backend() -> ThreadBackend:
    global _backend
    if _backend is None:
        _backend = ThreadBackend()
    return _backend
