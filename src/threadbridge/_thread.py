"""The thread backend: a process-wide pool of reusable daemon threads, and the rungs for a
thread (rung 2 injects ``TargetCancelled``; rung 3 abandons the thread)."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import logging
import os
import queue
import sys
import threading
import time
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


_WAKE = -1  # not the number of any work: wakes a waiting pool thread, nothing more


class _Ticket:
    """A new pool thread's place in ``starting``, until the thread takes it up (or the
    submit that made it is interrupted and gives it up: then the thread, if it runs at
    all, simply joins the idle ones)."""

    __slots__ = ("live",)

    def __init__(self) -> None:
        self.live = False


class ThreadPool:
    """Daemon threads shared by every event loop in the process.

    Work waits in one queue, as numbers: a pool thread looks the number up in
    ``pending`` and runs that work, so neither the queue nor a thread started for a work
    holds on to it. Idle threads block on the queue; a thread that finishes a run takes
    the next piece of work without going to sleep, which keeps throughput up when many
    callers hammer the pool.

    Under ``lock``, the pool keeps one promise: every pending work has a thread coming
    for it, ``len(pending) <= idle + starting``. Pool threads, where a Ctrl-C never
    lands, move work from ``pending`` to ``busy`` and count themselves idle or not; a
    submitting thread only adds its work to ``pending`` and, if the promise needs it,
    starts a thread. A signal handler that raises in the middle of that (the main thread
    runs them between any two steps) is taken back by ``withdraw()``: the counts stay
    right, and ``stats()`` with them.
    """

    def __init__(self) -> None:
        self._reset()
        _stats.register(self)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """Empty; also in a forked child, which has none of the parent's threads."""
        self.lock = threading.Lock()
        self.queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.numbers = itertools.count()
        self.idle = 0  # pool threads not running a target (waiting, or about to wait)
        self.starting = 0  # threads started for pending work, not yet among the idle
        self.pending: dict[int, ThreadWork] = {}  # submitted, no thread has taken it yet
        self.busy: dict[int, ThreadWork] = {}  # running on a pool thread
        self.abandoned: dict[int, ThreadWork] = {}  # given up on at rung 3, still running

    def submit(self, work: ThreadWork) -> None:
        """Hand ``work`` to an idle pool thread, or to a new one. If this raises, the
        caller calls ``withdraw(work)``."""
        with self.lock:
            self.pending[work.key] = work
            work.submitted = True
            ticket = self._reserve(work)
        self.queue.put(work.key)
        if ticket is not None:
            self._start(ticket)

    def _reserve(self, work: ThreadWork | None = None) -> _Ticket | None:
        """Under ``lock``: a place in ``starting`` if the promise needs another thread,
        kept on ``work`` (before it counts) for ``withdraw()`` to find."""
        if len(self.pending) <= self.idle + self.starting:
            return None
        ticket = _Ticket()
        if work is not None:
            work.ticket = ticket
        self.starting += 1
        ticket.live = True
        return ticket

    def _give_up(self, ticket: _Ticket | None) -> None:
        """Under ``lock``: that thread is not coming (or, if it runs, it is idle)."""
        if ticket is not None and ticket.live:
            ticket.live = False
            self.starting -= 1

    def _start(self, ticket: _Ticket) -> None:
        """Start a thread for ``ticket``; if it cannot start, it is not counted as coming."""
        try:
            threading.Thread(
                target=self._main, args=(ticket,), name="threadbridge-worker", daemon=True
            ).start()
        except BaseException:
            with self.lock:
                self._give_up(ticket)
            raise

    def withdraw(self, work: ThreadWork) -> bool:
        """Take back a submit that raised (a thread that could not start, a signal
        handler's exception). Whether the work will never run: no thread took it."""
        with self.lock:
            waiting = work.key in self.pending
            if waiting:
                del self.pending[work.key]  # its number may still be queued: it finds nothing
            self._give_up(work.ticket)  # its thread may never start
        _stats.changed()
        with contextlib.suppress(Exception):  # what start() raised is what the caller sees
            while True:  # other pending work may have counted on that thread
                with self.lock:
                    ticket = self._reserve()
                if ticket is None:
                    break
                self._start(ticket)
        return waiting or not work.submitted

    def _main(self, ticket: _Ticket) -> None:
        with self.lock:
            self._give_up(ticket)  # taken up: from here this thread counts as idle
            self.idle += 1
        del ticket
        get = self.queue.get
        clock = time.monotonic
        # When this thread retires if no work comes: IDLE_TIMEOUT after its last work. A
        # wake-up that brings no work (a withdrawn number, _WAKE) does not move it.
        deadline = clock() + IDLE_TIMEOUT
        while True:
            try:
                key = get(timeout=max(0.0, deadline - clock()))
            except queue.Empty:
                key = _WAKE
            with self.lock:
                work = self.pending.pop(key, None)
                if work is not None:
                    self.busy[key] = work
                    self.idle -= 1
                elif clock() < deadline:
                    continue  # a _WAKE or a withdrawn number, before this thread's time
                elif self.idle > len(self.pending):  # no pending work counts on us: retire
                    self.idle -= 1
                    others = self.idle > 0
                else:
                    deadline = clock() + IDLE_TIMEOUT
                    continue
            if work is None:
                if others:
                    # SimpleQueue.get() can miss its timeout for good: woken once its time
                    # is up for an item another thread took, it waits with no timeout.
                    # Such a thread is idle and counted, and would never retire: this
                    # wakes one waiting thread, which retires too if its own time is up.
                    self.queue.put(_WAKE)
                return
            reusable = work.run()
            del work  # nothing of a finished call stays reachable from an idle thread
            if not reusable:
                return
            deadline = clock() + IDLE_TIMEOUT

    def finished(self, work: ThreadWork, *, abandoned: bool) -> None:
        """Count out a work whose thread is done with it (and free, unless abandoned)."""
        with self.lock:
            if abandoned:
                del self.abandoned[work.key]
            else:
                del self.busy[work.key]
                self.idle += 1
        _stats.changed()

    def abandon(self, work: ThreadWork) -> bool:
        """Rung 3: give up on a running target. Whether it was still running."""
        with self.lock:
            if not work.state.abandon():
                return False
            self.abandoned[work.key] = self.busy.pop(work.key)
            return True

    # --- stats ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.lock:
            pending = len(self.pending)  # each has a thread coming: counted busy
            return {
                "idle_threads": max(0, self.idle - pending),
                "busy_threads": len(self.busy) + pending,
                "abandoned_threads": len(self.abandoned),
            }

    def describe_running(self) -> list[str]:
        with self.lock:
            busy = [*self.pending.values(), *self.busy.values()]
            abandoned = list(self.abandoned.values())
        return [w.describe() for w in busy] + [
            f"abandoned thread still running {w.run_.name}" for w in abandoned
        ]


class ThreadWork:
    """One target on one pool thread; the ladder's Work for the thread backend."""

    __slots__ = ("args", "context", "func", "key", "pool", "run_", "state", "submitted", "ticket")

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
        self.key = next(pool.numbers)  # its number in the pool's queue
        self.ticket: _Ticket | None = None  # for the thread that submitting it started
        self.submitted = False  # under the pool's lock: it went into ``pending``

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

    def run(self) -> bool:
        """Run the target and report how it ended; return whether the thread may be reused."""
        state = self.state
        outcome = state.run(self._call)
        # What the call used goes now: nothing of it may outlive the await, which can
        # return before this thread does.
        del self.func, self.args, self.context
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
            run.report(Ending.ENDED, outcome, interrupted=state.interrupted, hand_back=False)
            del outcome  # the run has it: the awaiter may take it, and drop it, at once
            run.hand_back()
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
        try:
            run.attach(work)  # before a thread can take it: from here the ladder reaches it
            self.pool.submit(work)
        except BaseException:
            # A thread that could not start, or a Ctrl-C in the middle (the main thread
            # runs signal handlers between any two steps): unless a pool thread has
            # taken it already (that thread reports), the target never runs. Its end is
            # ours to report once the run is attached; before, the caller's.
            if self.pool.withdraw(work) and run.attached:
                run.report(Ending.NOT_STARTED)
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
