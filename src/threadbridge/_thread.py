"""The thread backend: a process-wide pool of reusable daemon threads, and the rungs for a
thread (rung 2 injects ``TargetCancelled``; rung 3 abandons the thread)."""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import os
import queue
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any, Protocol

from . import _inject, _locks, _otel, _stats, _where
from ._backend import Backend
from ._callables import name_of
from ._ladder import Ending, Run
from ._target import Outcome, TargetState
from ._token import thread_slot

logger = logging.getLogger("threadbridge")

# anyio's figure for its default thread limiter, which in turn is trio's, which says it
# was pulled out of the air. Threads are cheap; 40 keeps a runaway caller from making
# thousands of them.
DEFAULT_THREAD_LIMIT = 40

# Idle pool threads retire after this many seconds without work. anyio uses 10 s too;
# long enough that a bursty service keeps its threads, short enough not to hoard them.
IDLE_TIMEOUT = 10.0


_ENDED = Ending.ENDED  # read on every call's path (see _ladder._ENDED)

_FUNCTION = types.FunctionType

_WAKE = -1  # not the number of any work: wakes a waiting pool thread, nothing more

# A ThreadWork's context that says: run the target in the pool thread's own context,
# which is empty as each such target starts (see ThreadPool._main), rather than enter
# one of its own. Never entered itself.
OWN_CONTEXT = contextvars.Context()


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
        # Calls that ended without the ladder's run (an Executor's, mostly): their
        # FINISHED stage, counted under the pool's lock, which the call takes anyway
        # (a fork's child keeps the parent's count, as it keeps _stats.stages).
        self.ended_by_themselves = 0
        self._reset()
        _stats.register(self)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """Empty; also in a forked child, which has none of the parent's threads."""
        self.lock = _locks.Lock()
        self.queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.numbers = itertools.count()
        self.idle = 0  # pool threads not running a target (waiting, or about to wait)
        self.starting = 0  # threads started for pending work, not yet among the idle
        self.pending: dict[int, ThreadWork] = {}  # submitted, no thread has taken it yet
        self.busy: dict[int, ThreadWork] = {}  # running on a pool thread
        self.abandoned: dict[int, ThreadWork] = {}  # given up on at rung 3, still running

    def submit(self, work: ThreadWork, plain: Plain | None = None) -> bool:
        """Hand ``work`` to an idle pool thread, or to a new one. If this raises, the
        caller calls ``withdraw(work)``.

        ``plain``, if given, is asked first to admit it, under the pool's lock (an engine
        that counts its calls under that lock too): if it says no, or raises, the work is
        not taken (False, or the error)."""
        with self.lock:
            if plain is not None and not plain.admit_plain(work):
                return False
            pending = self.pending
            pending[work.key] = work
            work.submitted = True
            # _reserve()'s test first, inline: an idle thread is there (every call's path).
            ticket = None if len(pending) <= self.idle + self.starting else self._reserve(work)
        self.queue.put(work.key)
        if ticket is not None:
            self._start(ticket)
        return True

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
        _inject.prepare_soon()
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
        ident = threading.get_ident()
        slot = thread_slot()  # where each target's token is set (see there)
        # Calls of the thread's own context (OWN_CONTEXT: an Executor's) run in an empty
        # context of this thread's, made again whenever a target leaves a variable set
        # in it: each such call starts in an empty context, as in a new thread, without
        # the cost of entering a new one every time.
        while True:
            own = contextvars.Context()
            if not own.run(self._serve, own, ident, slot):
                return

    def _serve(self, own: contextvars.Context, ident: int, slot: dict[str, Any]) -> bool:
        """Take and run work until the thread retires (False), or a target leaves a
        variable set in ``own``, the context it runs in (True: go on in a new one)."""
        get = self.queue.get
        clock = time.monotonic
        # When this thread retires if no work comes: IDLE_TIMEOUT after its last work. A
        # wake-up that brings no work (a withdrawn number, _WAKE) does not move it.
        timeout = IDLE_TIMEOUT
        deadline = clock() + timeout
        while True:
            try:
                key = get(timeout=timeout)
            except queue.Empty:
                key = _WAKE
            # Taken and given back by hand: no exception can land here (see _locks).
            lock = self.lock
            lock.acquire()
            try:
                work = self.pending.pop(key, None)
                if work is not None:
                    self.busy[key] = work
                    self.idle -= 1
                else:
                    now = clock()
                    if now < deadline:
                        # A _WAKE or a withdrawn number, before this thread's time.
                        timeout = deadline - now
                        continue
                    if self.idle <= len(self.pending):  # pending work counts on us: stay
                        timeout = IDLE_TIMEOUT
                        deadline = now + timeout
                        continue
                    self.idle -= 1  # retire
                    others = self.idle > 0
            finally:
                lock.release()
            del lock
            if work is None:
                if others:
                    # SimpleQueue.get() can miss its timeout for good: woken once its time
                    # is up for an item another thread took, it waits with no timeout.
                    # Such a thread is idle and counted, and would never retire: this
                    # wakes one waiting thread, which retires too if its own time is up.
                    self.queue.put(_WAKE)
                return False
            reusable = work.run(ident, slot)
            del work  # nothing of a finished call stays reachable from an idle thread
            if not reusable:
                return False
            if len(own):  # a target left a variable set: the next one starts clean
                return True
            timeout = IDLE_TIMEOUT
            deadline = clock() + timeout

    def finished(self, work: ThreadWork, *, abandoned: bool) -> None:
        """Count out a work whose thread is done with it (and free, unless abandoned)."""
        # In the pool thread, the target done: no exception lands here, and the lock is
        # taken and given back by hand (see _locks).
        lock = self.lock
        lock.acquire()
        try:
            if abandoned:
                del self.abandoned[work.key]
            else:
                del self.busy[work.key]
                self.idle += 1
        finally:
            lock.release()
        if _stats.waiters:  # changed()'s first test, inline: every thread call's path
            _stats.changed()

    def finished_locked(self, work: ThreadWork) -> None:
        """``finished()`` for a call that ended without its run, the pool's lock held by
        its engine: counted FINISHED here (its run would have counted it in
        ``_stats.stages``; ``stats()`` adds ``ended_by_themselves``). The caller calls
        ``_stats.changed()`` once it has let go of the lock."""
        del self.busy[work.key]
        self.idle += 1
        self.ended_by_themselves += 1

    def abandon(self, work: ThreadWork) -> bool:
        """Rung 3: give up on a running target. Whether it was still running."""
        with self.lock:
            if not work.abandon():
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

    def running(self) -> list[_stats.RunningTarget]:
        with self.lock:
            # Pending work counts as busy (a thread is coming for it), as in counts().
            busy = [*self.pending.values(), *self.busy.values()]
            abandoned = list(self.abandoned.values())
        seen = [w.seen_running(w.describe()) for w in busy] + [
            w.seen_running(f"abandoned thread still running {w.name}") for w in abandoned
        ]
        return [target for target in seen if target is not None]


class Plain(Protocol):
    """The engine of thread calls that start without a ladder (an Executor's): most
    calls end by themselves, and making the ladder's run for each would cost as much as
    the rest of the call. It is made when first needed (a cancel, ``running()``)."""

    def admit_plain(self, work: ThreadWork) -> bool:
        """Under the pool's lock, as the pool takes ``work``: whether it has a place
        (else it must queue); raises if the engine refuses calls."""
        ...

    def ensure_run(self, work: ThreadWork) -> Run | None:
        """The call's run, made now if it has none; None if the call has ended."""
        ...

    def ended_plain(self, work: ThreadWork, box: list[Outcome]) -> None:
        """In the pool thread: the call ended by itself, and never needed its run (the
        outcome is ``box``'s one item, taken out of it)."""
        ...


class ThreadWork(TargetState):
    """One target on one pool thread; the ladder's Work for the thread backend. It is
    also the target's state and token (one object per call: see ``TargetState``)."""

    __slots__ = (
        "args",
        "context",
        "func",
        "key",
        "name",
        "owner",
        "plain",
        "pool",
        "run_",
        "since",
        "submitted",
    )

    lock_by_hand = True  # rung 2 comes from another thread, under the lock
    ticket: _Ticket | None = None  # for the thread that submitting it started, if any

    def __init__(
        self,
        pool: ThreadPool,
        run: Run | None,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        context: contextvars.Context | None = None,
        plain: Plain | None = None,
    ) -> None:
        """``run`` None: a call of ``plain``'s, whose run is made when first needed."""
        # TargetState's fields, every one, set here rather than in a call of its
        # __init__ (every call's path; a test checks that none is missed).
        self._flag = False
        self.lock = _locks.Lock()
        self.started = self.running = self.pending = False
        self.thread_id = 0
        # The work's own.
        self.pool = pool
        self.run_ = run
        self.plain = plain  # until it ends (None then, if it never needed its run)
        self.owner: Any = None  # what ``plain`` keeps with the call (an Executor's future)
        self.func = func
        self.args = args
        if context is None:  # the caller's, as for anyio's and trio's worker threads
            context = contextvars.copy_context()
            sniffio = sys.modules.get("sniffio")
            # The target runs in no event loop, whatever the caller's context says, so
            # that sniffio answers "none" and anyio.run() / trio.run() work in it. (Most
            # callers' contexts say nothing: asyncio's and trio's own runs tell sniffio
            # otherwise. A context is entered only to change it, at a cost.)
            if sniffio is not None and context.get(sniffio.current_async_library_cvar):
                context.run(sniffio.current_async_library_cvar.set, None)
        self.context = context
        if run is None:
            # name_of(func), its first case inline (every executor call's path).
            self.name = func.__qualname__ if type(func) is _FUNCTION else name_of(func)
            self.portal = plain  # no event loop: the engine is its Link
        else:
            self.name = run.name
            if run.span is not None:  # the call's span is the target's current one
                _otel.make_current(context, run.span)
            self.portal = run.link  # from_thread finds its loop through it
        self.key = next(pool.numbers)  # its number in the pool's queue
        self.submitted = False  # under the pool's lock: it went into ``pending``
        self.since = time.monotonic()  # handed to the pool: a thread takes it at once

    # --- the rungs, called by the ladder ---------------------------------------------

    @property
    def _run(self) -> Run:
        """The call's run: only a run climbs the ladder, so the rungs have one."""
        run = self.run_
        assert run is not None
        return run

    def request_stop(self) -> None:
        self._set()

    def interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        if not _inject.CAN_INJECT:
            logger.info(
                "%s: rung 2 is not available on this interpreter "
                "(no PyThreadState_SetAsyncExc); going on to rung 3",
                self.describe(),
                extra=self._run.fields("interrupt_unavailable", self),
            )
            return False

        def found_then_announce() -> None:
            # Under the state's lock, the target running: where it is, before the record.
            self._seen()
            if announce is not None:
                announce()

        return self.request_interrupt(found_then_announce)

    def _seen(self) -> None:
        found = _where.snapshot(self.thread_id)  # formatted when asked for
        if found is not None:
            self._run.seen_at(found.line, found)

    def force(self) -> None:
        if not self.pool.abandon(self):
            return  # it has ended, or has not started (its token stops it): run() reports
        self._seen()  # given up on, still running: where it is stuck now
        logger.warning(
            "abandoning the %s (rung 3): it did not stop within its grace periods and is "
            "left running as a daemon; its result will be discarded%s",
            self.describe(),
            self._run.said_where(),
            extra=self._run.fields("abandon", self),
        )
        self._run.report(Ending.ABANDONED, release=False)

    backend = "thread"  # for the records of the ladder (Run.fields)

    @property
    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> str:
        return f"thread running {self.name}"

    def ladder(self) -> Run | None:
        """The call's run, made now if it started without one (see ``Plain``); None if
        it started without one and has ended."""
        run = self.run_
        if run is None:
            plain = self.plain
            if plain is not None:
                run = plain.ensure_run(self)
        return run

    def seen_running(self, said: str) -> _stats.RunningTarget | None:
        """What ``threadbridge.running()`` lists for it (None: it has just ended);
        ``said`` for leak reports."""
        run = self.ladder()
        if run is None:
            return None
        return _stats.RunningTarget(
            run,
            self.backend,
            self.since,
            self.pid,
            self.thread_id or None,
            self.where_now,
            said,
        )

    def where_now(self) -> str:
        """For ``RunningTarget.where()``: the target's stack now."""
        with self.lock:
            running = self.running
        if not running:
            return "(not running: it has ended, or has not started yet)"
        found = _where.snapshot(self.thread_id)
        return "(no frames of its own right now)" if found is None else found.stack()

    # --- in the pool thread ----------------------------------------------------------

    def run(self, thread_id: int, slot: dict[str, Any]) -> bool:
        """Run the target (in the pool thread ``thread_id``, whose ``thread_slot()`` is
        ``slot``) and report how it ended; return whether the thread may be reused."""
        outcome = self.run_target(self._call, thread_id, slot)
        # What the call used goes now: nothing of it may outlive the await, which can
        # return before this thread does.
        del self.func, self.args, self.context
        # Read without the state's lock: run_target() took it last to mark the target
        # ended, and ensure_run() makes no run for an ended target (see there).
        run = self.run_
        if run is None:  # a call of plain's that ended by itself, and never needed its run
            plain = self.plain
            assert plain is not None
            assert outcome is not None  # only a stop (a run's) keeps it from starting
            self.plain = None
            box = [outcome]
            del outcome
            plain.ended_plain(self, box)
            return True
        if self.abandoned:
            # Counted out first: whoever sees the limiter token come back must also see
            # stats() without this thread.
            self.pool.finished(self, abandoned=True)
            run.release()
            return False
        self.pool.finished(self, abandoned=False)
        if outcome is None:
            run.report(Ending.NOT_STARTED)
        else:
            run.report(_ENDED, outcome, interrupted=self.interrupted, hand_back=False)
            del outcome  # the run has it: the awaiter may take it, and drop it, at once
            run.hand_back()
        return True

    def _call(self) -> Outcome:
        try:
            context = self.context
            if context is OWN_CONTEXT:
                result = self.func(*self.args)
            else:
                result = context.run(self.func, *self.args)
            if type(result) is types.CoroutineType:
                result.close()
                raise TypeError(
                    f"threadbridge expected a sync function, but {self.name} returned "
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
        work = ThreadWork(self.pool, run, *job)
        try:
            run.attach(work)  # before a thread can take it: from here the ladder reaches it
            self.pool.submit(work)
        except BaseException as exc:
            # A thread that could not start, or a Ctrl-C in the middle (the main thread
            # runs signal handlers between any two steps): unless a pool thread has
            # taken it already (that thread reports), the target never runs. Its end is
            # ours to report once the run is attached (with what kept it from starting,
            # for whoever awaits it); before, the caller's.
            if self.pool.withdraw(work) and run.attached:
                run.report(Ending.ENDED, (False, exc))
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
