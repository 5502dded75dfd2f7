"""The escalation ladder and the handle that climbs it.

The ladder does not know what it climbs for. A backend supplies a ``Work`` with three
actions (set the token, interrupt, force) and reports back through ``Handle._settle``
when the target has ended or has been forced. Timing runs on one scheduler thread, not
on the event loop, so a ladder keeps climbing after the loop that started it has gone.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, Generic, Protocol, TypeVar

import anyio

from ._errors import TargetCancelled
from ._loop import Link
from ._policy import Policy, Stage, effective_graces
from ._stats import COUNTERS

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

logger = logging.getLogger("threadbridge")


class Work(Protocol):
    """What a backend gives the ladder for one running target."""

    def request_stop(self) -> None:
        """Rung 1: set the target's token. Must not block."""

    def interrupt(self) -> bool:
        """Rung 2. Returns False if the target had already ended. Must not block long."""

    def force(self) -> None:
        """Rung 3. If the target is still running, give it up and call handle._settle."""

    def describe(self) -> str:
        """A short description for log messages, such as the target's name."""


class _Scheduler:
    """One daemon thread that runs callbacks at deadlines; it exits when idle."""

    IDLE_EXIT = 5.0  # seconds with nothing scheduled before the thread exits

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._running = False

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        if math.isinf(delay):
            return
        when = time.monotonic() + delay
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if not self._running:
                self._running = True
                threading.Thread(target=self._main, name="threadbridge-ladder", daemon=True).start()
            elif self._heap[0][2] is fn:
                self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._heap:
                        if not self._cond.wait(self.IDLE_EXIT) and not self._heap:
                            self._running = False
                            return
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        _, _, fn = heapq.heappop(self._heap)
                        break
                    self._cond.wait(delay)
            try:
                fn()
            except BaseException:  # pragma: no cover - a bug in a rung must not stop the ladder
                logger.exception("threadbridge: error while escalating")


SCHEDULER = _Scheduler()


class Handle(Generic[T_co]):
    """A running piece of work: await it for its result, cancel it to stop it.

    Made by ``threadbridge.spawn()``. These two lines are equivalent:

        result = await run_killable(func, *args)
        result = await spawn(func, *args)

    Cancellation:
        Cancelling a task that awaits the handle (any cancel scope, ``task.cancel()``, a
        task group tearing down) starts the ladder, waits shielded until the work has
        stopped or been given up on, then lets the cancellation propagate.
    """

    __slots__ = (
        "__weakref__",
        "_cancel_time",
        "_end_time",
        "_limiter",
        "_link",
        "_lock",
        "_loop_event",
        "_loop_settled",
        "_name",
        "_outcome",
        "_policy",
        "_rung",
        "_stage",
        "_start_time",
        "_work",
    )

    def __init__(
        self, name: str, policy: Policy, link: Link, limiter: anyio.CapacityLimiter
    ) -> None:
        self._lock = threading.Lock()
        self._name = name
        self._policy = policy
        self._link = link
        self._limiter = limiter
        self._stage = Stage.RUNNING
        self._rung = 0
        self._outcome: tuple[bool, Any] | None = None
        self._work: Work | None = None
        self._start_time = time.monotonic()
        self._cancel_time: float | None = None
        self._end_time: float | None = None
        # Read and written in the loop's thread only.
        self._loop_settled = False
        self._loop_event: Any = None

    # --- public ---------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        """Where the work stands (``RUNNING``) or how it ended."""
        return self._stage

    @property
    def policy(self) -> Policy:
        """The escalation policy this handle climbs by."""
        return self._policy

    @property
    def name(self) -> str:
        """The target's name, as used in log messages."""
        return self._name

    def done(self) -> bool:
        """Whether the work has ended or been given up on."""
        return self._stage is not Stage.RUNNING

    @property
    def stop_latency(self) -> float | None:
        """Seconds from the first cancel to the end of the work; None if not both happened."""
        if self._cancel_time is None or self._end_time is None:
            return None
        return max(0.0, self._end_time - self._cancel_time)

    def cancel(self) -> None:
        """Start climbing the ladder now and return at once. Idempotent.

        Sets the target's token (rung 1); after ``policy.grace`` the ladder interrupts
        (rung 2) and after ``policy.interrupt_grace`` more it abandons or kills (rung 3),
        each rung skipped if the work has ended by then. Safe to call from any thread.
        """
        with self._lock:
            if self._rung or self._stage is not Stage.RUNNING:
                return
            self._rung = 1
            self._cancel_time = time.monotonic()
            work = self._work
        if work is not None:
            work.request_stop()
        SCHEDULER.call_later(effective_graces(self._policy)[0], self._rung2)

    async def stop(self) -> Stage:
        """Climb the ladder and wait until the work has stopped or been given up on.

        Returns:
            The stage the work ended in.

        Cancellation:
            If the task calling ``stop()`` is cancelled, it still waits (shielded) for the
            ladder, then the cancellation propagates.
        """
        self.cancel()
        await self._link.wait_settled(self)
        return self._stage

    async def wait(self) -> T_co:
        """Wait for the target's result, and return it or raise its exception.

        Raises:
            TargetCancelled: the work was stopped through ``cancel()`` or ``stop()``
                (not by cancelling this await) and ended by being cancelled, interrupted,
                abandoned or killed.

        Cancellation:
            * rung 1: the target's token is set (``cancel_requested()`` turns true).
            * rung 2, after ``policy.grace``: ``TargetCancelled`` is raised inside it.
            * rung 3, after ``policy.interrupt_grace``: the thread is abandoned, or the
              worker process killed.
            Then the native cancellation propagates; the target's own outcome, if it
            ended meanwhile, is discarded.
        """
        if not self._link.is_current():
            raise RuntimeError(
                "this handle belongs to another event loop; await it in the loop that "
                "called spawn()"
            )
        await self._link.wait_settled(self)
        return self._result()

    async def _wait_here(self) -> T_co:
        """wait() for a handle known to belong to the running loop."""
        await self._link.wait_settled(self)
        return self._result()

    def __await__(self) -> Generator[Any, None, T_co]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<threadbridge.Handle {self._name} {self._stage.name}>"

    # --- internal -------------------------------------------------------------------

    def _result(self) -> T_co:
        outcome = self._outcome
        if outcome is None:
            raise TargetCancelled(f"{self._name} was {self._stage.value} (rung 3)")
        ok, value = outcome
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _start(self, work: Work) -> None:
        """Attach the running work; apply a cancel() that came before it started."""
        with self._lock:
            self._work = work
            early = self._rung > 0
        if early:
            work.request_stop()

    def _settle(
        self,
        stage: Stage,
        outcome: tuple[bool, Any] | None,
        *,
        released: bool,
        counted: bool = False,
        in_loop: bool = False,
    ) -> None:
        """The work ended (or was forced). Called exactly once, from any thread.

        The backend decides, under its own lock, whether the target ended or was forced,
        so only one of the two ever calls this.
        """
        with self._lock:
            if self._stage is not Stage.RUNNING:
                # Reported twice (a race between ending and being forced that the backend
                # did not settle): the first report stands, and the limiter token must
                # not be given back twice.
                logger.debug(
                    "threadbridge: %s reported twice (%s, then %s)", self, self._stage, stage
                )
                return
            self._outcome = outcome
            self._end_time = time.monotonic()
            self._stage = stage  # last: done() and the ladder read it without the lock
        if not counted:
            COUNTERS.ended(stage)
        then = self._loop_release_and_wake if released else self._loop_wake
        if in_loop:  # already in the loop's thread: no need to go round it
            then()
        else:
            self._link.post(then)

    def _released(self) -> None:
        """A forced target has really ended now: give its capacity back."""
        self._link.post(self._loop_release)

    def _loop_release(self) -> None:
        # Runs as a loop callback, where an exception would take the whole loop down
        # (trio turns it into TrioInternalError): a token that is not held is logged.
        try:
            self._limiter.release_on_behalf_of(self)
        except RuntimeError:
            logger.debug("threadbridge: %s held no limiter token to give back", self)

    def _loop_wake(self) -> None:
        self._loop_settled = True
        waiters = self._loop_event
        if waiters is not None:
            self._link.wake(waiters)

    def _loop_release_and_wake(self) -> None:
        self._loop_release()
        self._loop_wake()

    def _rung2(self) -> None:
        work = self._work
        if self._stage is not Stage.RUNNING or work is None:
            return
        policy = self._policy
        if policy.interrupt:
            with self._lock:
                self._rung = 2
            grace, delay = effective_graces(policy)
            if work.interrupt():
                logger.info(
                    "threadbridge: %s ignored its token for %ss; interrupting it (rung 2)",
                    work.describe(),
                    grace,
                )
        else:
            delay = 0.0
        if policy.force:
            SCHEDULER.call_later(delay, self._rung3)

    def _rung3(self) -> None:
        work = self._work
        if self._stage is not Stage.RUNNING or work is None:
            return
        with self._lock:
            self._rung = 3
        work.force()
