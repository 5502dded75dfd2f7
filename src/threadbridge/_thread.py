"""Thread targets: a pool of reusable daemon threads, and the rungs for a thread."""

from __future__ import annotations

import contextvars
import inspect
import logging
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

# Idle threads, most recently used last. Guarded by COUNTERS.cond, so that the list and
# the counters that stats() reports change together.
_idle: list[_PoolThread] = []


class _PoolThread:
    """A daemon thread that runs one ThreadWork after another until it idles out."""

    __slots__ = ("_lock", "_work")

    def __init__(self, work: ThreadWork) -> None:
        # Released to hand over work; the thread blocks on it while idle.
        self._lock = threading.Lock()
        self._lock.acquire()
        self._work: ThreadWork | None = work
        threading.Thread(target=self._main, name="threadbridge-worker", daemon=True).start()

    def _main(self) -> None:
        while True:
            work = self._work
            self._work = None
            assert work is not None
            if not work.run(self):
                return  # abandoned: this thread is never reused
            if not self._lock.acquire(timeout=IDLE_TIMEOUT):
                with COUNTERS.cond:
                    if self in _idle:
                        _idle.remove(self)
                        COUNTERS.idle_threads -= 1
                        return
                # Someone took this thread just as it timed out; their work is coming.
                self._lock.acquire()

    def hand_over(self, work: ThreadWork) -> None:
        self._work = work
        self._lock.release()


def submit(work: ThreadWork) -> None:
    """Run ``work`` on an idle pool thread, or on a new one."""
    with COUNTERS.cond:
        thread = _idle.pop() if _idle else None
        if thread is not None:
            COUNTERS.idle_threads -= 1
        COUNTERS.busy_threads += 1
    if thread is None:
        try:
            _PoolThread(work)
        except BaseException:
            COUNTERS.add(busy_threads=-1)
            raise
    else:
        thread.hand_over(work)


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
        self.state = _token.TargetState(_token.Token())

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
        with COUNTERS.cond:
            COUNTERS.busy_threads -= 1
            COUNTERS.abandoned_threads += 1
            COUNTERS.cond.notify_all()
        logger.warning(
            "threadbridge: abandoning the thread running %s (rung 3): it did not stop "
            "within its grace periods and is left running as a daemon; its result will "
            "be discarded",
            self.describe(),
        )
        self.handle._settle(Stage.ABANDONED, None, released=False)

    def describe(self) -> str:
        return self.handle.name

    # --- in the pool thread ----------------------------------------------------------

    def run(self, thread: _PoolThread) -> bool:
        """Run the target; return whether the thread may be reused."""
        state = self.state
        local = _token._local
        state.thread_id = threading.get_ident()
        local.state = state
        local.token = state.token
        state.running = True
        try:
            outcome = self._call()
        except TargetCancelled as exc:
            # Rung 2 landed in _call's own bookkeeping, after the target had returned.
            outcome = (False, exc)
        abandoned = state.settle()
        # From here on no injected exception can reach this thread.
        local.state = None
        local.token = _token.NEVER_SET
        if abandoned:
            COUNTERS.add(abandoned_threads=-1)
            self.handle._released()
            return False
        if state.interrupt_requested:
            stage = Stage.INTERRUPTED
        elif state.token._flag:
            stage = Stage.COOPERATIVE
        else:
            stage = Stage.FINISHED
        with COUNTERS.cond:
            COUNTERS.busy_threads -= 1
            COUNTERS.idle_threads += 1
            _idle.append(thread)
            COUNTERS.cond.notify_all()
        self.handle._settle(stage, outcome, released=True)
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
