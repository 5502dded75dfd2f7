"""Running one target under its token and its rung-2 state.

The one algorithm that pool threads and worker processes share: mark the target running,
call it, and mark it ended, in such a way that rung 2 can land only while the target
itself runs, never in the code around it, and is withdrawn if it has not fired by then.
Worker processes import this module: it stays light (no anyio, no trio, no threads).
"""

from __future__ import annotations

import sys as _sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from . import _inject
from ._errors import TargetCancelled
from ._inject import _Redeliver
from ._token import NEVER_SET, Token, thread_slot

Outcome = tuple[bool, Any]  # (True, value returned) or (False, exception raised)

# Where rung 2 is a signal (worker processes, Ray tasks), it may reach the process without
# reaching the handler in time: CPython runs a Python signal handler only between
# bytecodes, so a signal that arrives just before the target's thread enters a blocking
# call (time.sleep, a read, a lock) is handled only once that call returns, which may be
# never. Until the handler has run, the signal is sent to the target's thread again, after
# RESEND_FIRST seconds, then twice as long each time, up to RESEND_MAX apart (rung 3 ends
# it all). A resent signal lands at most once: the handler raises only the first time.
RESEND_FIRST = 0.01
RESEND_MAX = 1.0


def resend_delays() -> Iterator[float]:
    """The pauses before each resend of rung 2's signal: RESEND_FIRST, doubling, up to
    RESEND_MAX."""
    delay = RESEND_FIRST
    while True:
        yield delay
        delay = min(delay * 2, RESEND_MAX)


class TargetState(Token):
    """Per-run state shared by the target's thread and whatever delivers rung 2.

    A thread target gets rung 2 from the ladder, another thread: everything that decides
    whether it may land happens under ``lock``, and it is injected only while ``running``
    is true and outside ``uninterruptible()`` blocks. A worker process gets rung 2 as a
    signal, handled in the target's own thread (``interrupt_here``), which must not take
    the lock: the thread may hold it when the signal arrives.

    It is also the run's ``Token`` (what ``current_token()`` returns): one object per
    run rather than two, on every call's path.
    """

    __slots__ = ("lock", "pending", "portal", "running", "started", "thread_id")

    #: The pool thread's state (``_thread.ThreadWork``): rung 2 comes only from another
    #: thread, injected under ``lock``, so the target's first locked step may take the
    #: lock by hand (faster than ``with``, see ``_locks``). Not so where a signal handler
    #: delivers it, in the target's own thread.
    lock_by_hand = False

    # What most runs never change, as defaults of the class (see Token).
    depth = 0  # nesting of uninterruptible() blocks
    interrupted = False  # rung 2 was delivered to the running target (once)
    deferred = False  # delivered inside uninterruptible(); raised when it exits
    abandoned = False  # rung 3 gave up on it: its thread must never be reused
    # Worker processes: sends rung 2's signal to the target's thread once more (rung 2
    # comes as a signal there, and only a signal ends a blocking call such as a sleep).
    resend: Callable[[int], None] | None = None
    again = False  # resent: the next interrupt_here() raises once more

    def __init__(self, lock: threading.Lock) -> None:
        # A subclass on every call's path (ThreadWork) sets these itself, all of them.
        self._flag = False
        self.lock = lock  # never held while another lock is taken
        self.started = False  # a thread has picked it up (and decided whether to run it)
        self.running = False  # the target itself may be running: rung 2 may land
        self.thread_id = 0
        self.pending = False  # injected into the thread, not known to have been raised
        self.portal: object = None  # thread targets: the caller's Link, for from_thread

    # --- from the ladder (other threads) -----------------------------------------------

    def request_interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        """Rung 2 for a thread target. Returns whether it reached a running target;
        ``announce`` is called first, once that is certain (see Work.interrupt)."""
        with self.lock:
            if self.interrupted or not self.running:
                return False
            self.interrupted = True
            if announce is not None:
                announce()
            if self.depth:
                self.deferred = True
            else:
                self.pending = True
                _inject.inject(self.thread_id)
            return True

    def deliver_again(self) -> None:
        """Rung 2 fired where CPython drops exceptions (a __del__, a gc or weakref callback):
        deliver it once more, if the target still runs (from a helper thread)."""
        with self.lock:
            if not self.running or self.pending or self.deferred or self.again:
                return
            if self.depth:
                self.deferred = True
            elif self.resend is not None:
                self.again = True
                self.resend(self.thread_id)
            else:
                self.pending = True
                _inject.inject(self.thread_id)

    def abandon(self) -> bool:
        """Rung 3 for a thread target. Returns whether it was running (and is now given up
        on); a target that has not started is stopped by its token when picked up."""
        with self.lock:
            if not self.running:
                return False
            self.abandoned = True
            return True

    # --- in the target's own thread ------------------------------------------------------

    def interrupt_here(self, message: str) -> None:
        """Rung 2 delivered in the target's own thread (a worker's SIGTERM handler)."""
        if not self.running or (self.interrupted and not self.again):
            return
        self.interrupted = True
        self.again = False
        _inject.catch_dropped()
        if self.depth:
            self.deferred = True  # raised when the outermost uninterruptible() exits
            return
        raise _inject.Interrupted(message)

    def hold(self) -> None:
        """Enter an uninterruptible() block."""
        try:
            with self.lock:
                if self.pending:
                    # Injected before the block began and not fired yet: deliver it here,
                    # before the block, rather than somewhere inside it.
                    self.pending = False
                    _inject.clear_injection(self.thread_id)
                    raise _inject.Interrupted("interrupted (rung 2)")
                self.depth += 1
        except TargetCancelled:
            self.pending = False
            raise

    def release(self) -> None:
        """Leave an uninterruptible() block; raise a rung 2 that was held off."""
        with self.lock:
            self.depth -= 1
            fire = self.depth == 0 and self.deferred
            if fire:
                self.deferred = False
        if fire:
            # Interrupted, as any rung 2: delivered again if CPython drops it (a __del__).
            raise _inject.Interrupted(
                "interrupted (rung 2, held off until uninterruptible() ended)"
            )

    @property
    def token(self) -> Token:
        """The run's token: this state itself."""
        return self

    def run_target(
        self,
        call: Callable[[], Outcome],
        thread_id: int = 0,
        slot: dict[str, Any] | None = None,
    ) -> Outcome | None:
        """Run ``call`` (which returns the target's outcome) as this state's target.

        Returns None if a stop was requested before it started: it is then never called.
        Once this returns, no rung 2 can reach the calling thread any more. ``thread_id``
        and ``slot`` (``_token.thread_slot()``): the calling thread's ident and its
        namespace of the current token, if the caller has them at hand.
        """
        self.thread_id = thread_id or threading.get_ident()
        if type(_sys.unraisablehook) is not _Redeliver:  # catch_dropped()'s test, inline
            _inject.catch_dropped()  # wrapped before the target runs, not as rung 2 comes
        if slot is None:
            slot = thread_slot()
        slot["token"] = self  # and so the state (see _token._Local, thread_slot())
        lock = self.lock
        started = False
        try:
            # From the moment the target is marked running, rung 2 may land: before its
            # first line or after its last, so all of this stays in the try.
            if self.lock_by_hand:  # see lock_by_hand: nothing lands before release()
                lock.acquire()
                self.started = True
                if not self._flag:  # else stopped before it started: never run it
                    self.running = started = True
                lock.release()
            else:
                with lock:
                    self.started = True
                    if not self._flag:
                        self.running = started = True
            if started:
                outcome = call()
        except TargetCancelled as exc:
            outcome = (False, exc)
            started = True
        if started:
            while True:
                try:
                    with lock:
                        self.running = False
                        if self.pending:
                            self.pending = False
                            _inject.clear_injection(self.thread_id)
                    break
                except TargetCancelled:
                    # Rung 2 reached the target as it returned and fired on the way into
                    # that block or inside it: it is spent. (After it nothing fires.)
                    self.pending = False
        slot["token"] = NEVER_SET
        return outcome if started else None
