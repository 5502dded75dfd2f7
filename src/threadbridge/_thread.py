"""Thread targets: a pool of reusable daemon threads, and the rungs for a thread."""

from __future__ import annotations

import contextvars
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from . import _token
from ._errors import TargetCancelled
from ._ladder import Handle
from ._policy import Stage
from ._stats import COUNTERS

logger = logging.getLogger("threadbridge")

# Idle pool threads retire after this many seconds without work. anyio uses 10 s too;
# long enough that a bursty service keeps its threads, short enough not to hoard them.
IDLE_TIMEOUT = 10.0

# Work waiting for a pool thread. Idle threads block on it; a thread that finishes a run
# takes the next piece of work without going to sleep, which is what keeps throughput up
# when many callers hammer the pool.
_queue: queue.SimpleQueue[ThreadWork] = queue.SimpleQueue()


def _pool_main(work: ThreadWork | None) -> None:
    while True:
        if work is None:
            try:
                work = _queue.get(timeout=IDLE_TIMEOUT)
            except queue.Empty:
                with COUNTERS.lock:
                    # Retire only if no submit() has counted on this thread: a submit
                    # takes an idle thread by decrementing idle_threads before its put().
                    if COUNTERS.idle_threads > 0 and _queue.empty():
                        COUNTERS.idle_threads -= 1
                        return
                continue
        if not work.run():
            return  # abandoned: this thread is never reused
        work = None


def submit(work: ThreadWork) -> None:
    """Run ``work`` on an idle pool thread, or on a new one."""
    with COUNTERS.lock:
        reuse = COUNTERS.idle_threads > 0
        if reuse:
            COUNTERS.idle_threads -= 1
        COUNTERS.busy_threads += 1
        COUNTERS.running[id(work)] = work
    if reuse:
        _queue.put(work)
        return
    try:
        threading.Thread(
            target=_pool_main, args=(work,), name="threadbridge-worker", daemon=True
        ).start()
    except BaseException:
        with COUNTERS.lock:
            COUNTERS.busy_threads -= 1
            del COUNTERS.running[id(work)]
            COUNTERS.wake()
        raise


class ThreadWork:
    """One target in one pool thread; the ladder's Work for the thread backend."""

    __slots__ = ("args", "context", "func", "handle", "state")

    def __init__(
        self, handle: Handle[Any], func: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        self.handle = handle
        self.func = func
        self.args = args
        self.context = contextvars.copy_context()
        self.state = _token.TargetState(_token.Token(), handle._lock)

    # --- the rungs, called by the ladder ---------------------------------------------

    def request_stop(self) -> None:
        self.state.token._set()

    def interrupt(self) -> bool:
        if not _token.CAN_INJECT:
            logger.info(
                "threadbridge: %s: rung 2 is not available on this interpreter "
                "(no PyThreadState_SetAsyncExc); going on to rung 3",
                self.describe(),
            )
            return False
        return self.state.request_interrupt()

    def force(self) -> None:
        if not self.state.abandon():
            return  # it has just ended; run() reports it
        with COUNTERS.lock:
            COUNTERS.busy_threads -= 1
            COUNTERS.abandoned_threads += 1
            COUNTERS.wake()
        logger.warning(
            "threadbridge: abandoning the thread running %s (rung 3): it did not stop "
            "within its grace periods and is left running as a daemon; its result will "
            "be discarded",
            self.describe(),
        )
        self.handle._settle(Stage.ABANDONED, None, released=False)

    def describe(self) -> str:
        return self.handle.name

    def describe_running(self) -> str:
        if self.state.abandoned:
            return f"abandoned thread still running {self.describe()}"
        return f"thread running {self.describe()}"

    # --- in the pool thread ----------------------------------------------------------

    def run(self) -> bool:
        """Run the target; return whether the thread may be reused."""
        state = self.state
        local = _token._local
        state.thread_id = threading.get_ident()
        local.state = state
        local.token = state.token
        started = False
        try:
            # From the moment begin() marks the target running, rung 2 may be injected:
            # it can fire before the target's first line or after its last, so all of
            # this stays inside the try.
            started = state.begin()
            if started:
                outcome = self._call()
            else:  # the ladder got to rung 2 or 3 before a thread picked it up
                outcome = (False, TargetCancelled("stopped before it started"))
        except TargetCancelled as exc:
            # Rung 2 landed in this bookkeeping, just before or after the target.
            outcome = (False, exc)
            started = True
        abandoned = False
        while started:
            try:
                abandoned = state.settle()
                break
            except TargetCancelled:
                # Rung 2 reached the target as it returned and fired on the way into
                # settle() or inside it: it is spent. (After settle() nothing can fire.)
                state.pending = False
        # From here on no injected exception can reach this thread.
        local.state = None
        local.token = _token.NEVER_SET
        if abandoned:
            # Counted out first: whoever sees the limiter token come back must also see
            # stats() without this thread.
            with COUNTERS.lock:
                COUNTERS.abandoned_threads -= 1
                del COUNTERS.running[id(self)]
                COUNTERS.wake()
            self.handle._released()
            return False
        if state.interrupt_requested:
            stage = Stage.INTERRUPTED
        elif state.token._flag:
            stage = Stage.COOPERATIVE
        else:
            stage = Stage.FINISHED
        with COUNTERS.lock:
            COUNTERS.busy_threads -= 1
            COUNTERS.idle_threads += 1
            COUNTERS.stages[stage] += 1
            del COUNTERS.running[id(self)]
            COUNTERS.wake()
        self.handle._settle(stage, outcome, released=True, counted=True)
        return True

    def _call(self) -> tuple[bool, Any]:
        try:
            result = self.context.run(self.func, *self.args)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(
                    f"threadbridge expected a sync function, but {self.handle.name} returned "
                    "a coroutine; await it in the event loop instead of running it in a thread"
                )
            return (True, result)
        except BaseException as exc:
            return (False, exc)
