"""Future: a ``concurrent.futures.Future`` whose running work can be stopped."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from concurrent.futures._base import (  # the states' names, unchanged since Python 3.2
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, TypeVar

from ._ladder import Run
from ._locks import Condition
from ._policy import Stage
from ._public import export

T = TypeVar("T")

_NOT_CANCELLED = (PENDING, RUNNING)


# How long call() sleeps in the main thread at most before it runs pending signal handlers.
# The kernel hands a Ctrl-C to any thread of the process, often the pool thread running
# the target: that does not wake a main thread asleep on a lock, and its KeyboardInterrupt
# would wait for the lock. The main thread wakes this often to look.
SLICE = 0.1


def _wait_in_slices(
    condition: threading.Condition | Condition, predicate: Callable[[], bool], timeout: float | None
) -> bool:
    """``condition.wait_for(predicate, timeout)``; in the main thread in slices, so that
    signal handlers (Ctrl-C) run within a slice whichever thread took the signal."""
    if threading.get_ident() != threading.main_thread().ident:
        with condition:
            return condition.wait_for(predicate, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
        with condition:
            if condition.wait_for(predicate, max(0.0, left)):
                return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


class Future(concurrent.futures.Future[T]):
    """A ``concurrent.futures.Future`` whose running work can be stopped.

    Made by ``Executor.submit()``; passes for a stdlib future everywhere
    (``concurrent.futures.wait()``, ``as_completed()``, ``asyncio.wrap_future()``).

    * ``cancel()``: a pending call never runs; a running one starts the ladder (rung 1 at
      once) and the future is CANCELLED at once, while the ladder goes on, bounded by the
      policy. Only a finished future refuses (False).
    * ``stage``: where the work stands, or how it ended (``Stage``).
    * ``wait_stopped(timeout)``: wait until the work has really stopped (or been given up
      on at rung 3).
    * ``stopped_at``: where the work was stuck, if the ladder had to interrupt it.
    """

    # Defaults on the class, set on the future only when they change: every submit
    # makes one.
    _run: Run | None = None  # the call's ladder; None for a future made by hand
    _dropped: BaseException | None = None  # what a cancelled call raised
    _job: Any = None  # what its engine starts, until it does
    _launched = False  # an engine's loop has taken the call up
    # A thread call started without its run (see _plain.ThreadCore.ensure_run): its
    # ThreadWork, which makes the run when the call is cancelled.
    _work: Any = None

    def __init__(self) -> None:
        # The stdlib's fields, with threadbridge's condition: a lock and a condition in
        # one object, a sixth of the cost of making a threading.Condition (which was as
        # much as the rest of a thread call's bookkeeping), and safe to enter on 3.14.
        self._condition = Condition()  # type: ignore[assignment]
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks: list[Callable[[Future[T]], object]] = []

    @property
    def stage(self) -> Stage:
        """Where the work stands (``RUNNING``, also while it waits for a worker) or how
        it ended."""
        run = self._run
        if run is not None:
            return run.stage
        # A future made by hand: it has no ladder.
        if not self.done():
            return Stage.RUNNING
        return Stage.COOPERATIVE if self.cancelled() else Stage.FINISHED

    @property
    def stopped_at(self) -> str | None:
        """The work's stack as its ladder went past rung 1 (see ``Handle.stopped_at``);
        None while it has not, and for a future made by hand."""
        run = self._run
        return None if run is None else run.stopped_at

    def cancel(self) -> bool:
        """Stop the work: a pending call never runs, a running one climbs the ladder.

        Returns True, and the future is cancelled at once, unless it has finished (then
        False, as for a stdlib future). ``wait_stopped()`` waits for the work itself.
        """
        run = self._run
        if run is None:
            work = self._work
            run = None if work is None else work.ladder()
            if run is None:  # made by hand, or a call that has ended by itself
                return super().cancel()
        with self._condition:
            state = self._state
            if state not in _NOT_CANCELLED:
                return state != FINISHED
            # Notified at once: the executor never looks at a cancelled call again, so
            # concurrent.futures.wait() and as_completed() must hear of it now.
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        run.cancel()  # after the state: a run that settles at once finds it cancelled
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait until the work has stopped, or been given up on (rung 3); whether it had
        within ``timeout`` seconds (None: no limit).

        A future that finished has stopped; a cancelled one has once its ladder is done.
        """
        if self._run is None and self._work is None:  # made by hand: stops when done
            done, _ = concurrent.futures.wait((self,), timeout)
            return bool(done)
        with self._condition:
            return self._condition.wait_for(self._has_stopped, timeout)

    def _has_stopped(self) -> bool:
        # The run has settled: the work has stopped, or been given up on at rung 3; and
        # the future is done (the run settles first, then hands its outcome over, which
        # notifies). A call that never needed its run has stopped once it is done.
        run = self._run
        return self._is_done() and (run is None or run.settled)

    def _wait_done(self, timeout: float | None) -> bool:
        return _wait_in_slices(self._condition, self._is_done, timeout)

    def _wait_stopped_here(self) -> None:
        """Wait until the work has stopped; in the main thread, awake to Ctrl-C."""
        _wait_in_slices(self._condition, self._has_stopped, None)

    def _is_done(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

    def _mark_running(self) -> None:
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING

    def _settle(self, run: Run) -> None:
        """The run has settled: hand its outcome to the future, unless it was cancelled."""
        # run.take(), inline (every call's path): the run no longer keeps the result.
        outcome, error = run._outcome, run._release_error
        run._outcome = run._release_error = run._span_kept = None
        try:
            if error is None and outcome is not None:
                if outcome[0]:
                    box = [outcome[1]]
                    del outcome
                    self._set_result_from(box)
                    return
                exc = outcome[1]
            else:
                try:
                    run.settle(outcome, error)
                except BaseException as raised:
                    exc = raised
                else:  # pragma: no cover - settle() always raises without an outcome
                    exc = RuntimeError(f"{run.name} ended without an outcome")
            del outcome
            try:
                self.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                self._dropped = exc  # call() chains it to its TimeoutError
                raise
        except concurrent.futures.InvalidStateError:
            # Cancelled: its outcome is dropped, and whoever waits for it to stop is told.
            with self._condition:
                self._condition.notify_all()

    def _left_in_parent(self) -> None:
        """In a fork's child: this call was submitted before the fork, and runs (or waits
        for its place) in the parent, never here. Settled with an error that says so,
        without the parent's waiters and callbacks (they belong to the parent's threads
        and loops) or its lock (a parent's thread may have held it at the fork)."""
        self._condition = Condition()  # type: ignore[assignment]  # see __init__
        self._waiters = []
        self._done_callbacks = []
        self._run = self._work = self._job = None  # its ladder is the parent's
        if self._state in _NOT_CANCELLED:
            self._state = FINISHED
            self._exception = RuntimeError(
                "this call was submitted before the process forked: it runs in the parent "
                "process, and its outcome is there; submit it again in this process if it "
                "needs it here"
            )

    def _set_result_from(self, box: list[Any]) -> None:
        """``set_result(box.pop())``, holding no reference to the value once a waiter
        can run: the thread that settles the future may still be on its way out when
        the caller, woken, has dropped the result and expects it gone (on a
        free-threaded build, at once). Raises InvalidStateError if it was cancelled."""
        condition: Condition = self._condition  # type: ignore[assignment]  # see __init__
        with condition:
            if self._state not in _NOT_CANCELLED:
                box.clear()
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = box.pop()
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_result(self)
            condition.notify_all()
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        text = super().__repr__()
        run = self._run
        if run is None:
            work = self._work
            if work is None:  # a future made by hand: the stdlib's words
                return text
            return f"{text[:-1]} {work.name} stage={self.stage.value}>"
        return f"{text[:-1]} {run.name} stage={run.stage.value}>"


export(Future)
