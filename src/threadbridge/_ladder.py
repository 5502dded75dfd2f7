"""The escalation ladder: one run of a target, the rungs it climbs, the stage it ends in.

The ladder does not know what it climbs for. A backend gives it a ``Work`` (set the
token, interrupt, force) and reports back through ``Run.report()``; the stage is decided
here, in ``decide_stage()``, from that report and the rung the ladder had reached. Timing
runs on the scheduler thread (``_scheduler``), so a ladder keeps climbing after the loop
that started it has gone; a run withdraws its pending timer when it settles.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Any, Protocol

from . import _stats
from ._errors import TargetCancelled
from ._loop import Link
from ._policy import Policy, Stage, effective_graces
from ._scheduler import SCHEDULER, Scheduler, Timer
from ._target import Outcome

logger = logging.getLogger("threadbridge")


class Rung(enum.IntEnum):
    """How far the ladder has climbed for a run."""

    NONE = 0
    STOP = 1  # the token is set
    INTERRUPT = 2  # TargetCancelled raised inside (thread) or SIGTERM (process)
    FORCE = 3  # abandoned (thread) or SIGKILLed (process)


class Ending(enum.Enum):
    """What a backend reports about how a run ended."""

    ENDED = "ended"  # the target returned or raised (or its worker died under it)
    NOT_STARTED = "not started"  # a stop came before it started: it never ran
    ABANDONED = "abandoned"  # rung 3 gave up on a thread that is still running
    KILLED = "killed"  # rung 3 killed the process running it


def decide_stage(ending: Ending, *, interrupted: bool, rung: Rung) -> Stage:
    """The stage a run ends in: the one place where it is decided.

    ``interrupted`` says whether rung 2 reached the running target; ``rung`` is how far
    the ladder had got when the backend reported the ending.
    """
    if ending is Ending.ABANDONED:
        return Stage.ABANDONED
    if ending is Ending.KILLED:
        return Stage.KILLED
    if ending is Ending.NOT_STARTED:
        return Stage.COOPERATIVE if rung >= Rung.STOP else Stage.FINISHED
    if interrupted:
        return Stage.INTERRUPTED
    return Stage.COOPERATIVE if rung >= Rung.STOP else Stage.FINISHED


class Limiter(Protocol):
    """The capacity-limiter interface (``anyio.CapacityLimiter``, ``trio.CapacityLimiter``)."""

    def acquire_on_behalf_of_nowait(self, borrower: object) -> None: ...

    async def acquire_on_behalf_of(self, borrower: object) -> None: ...

    def release_on_behalf_of(self, borrower: object) -> None: ...


class Work(Protocol):
    """What a backend gives the ladder for one started target.

    Every method is called from any thread (the canceller's, the scheduler's) and must
    return promptly: no waiting for processes, pipes or locks held for long. Whatever
    takes time (reaping a killed worker) happens elsewhere and reports through
    ``Run.report()`` when done.
    """

    def request_stop(self) -> None:
        """Rung 1: set the target's token."""

    def interrupt(self) -> bool:
        """Rung 2. Returns whether it reached a running target (False: it had ended,
        had not started, or rung 2 is not available here)."""
        ...

    def force(self) -> None:
        """Rung 3: give up on a target that is still running, then report ABANDONED or
        KILLED. If it has ended meanwhile, do nothing: its own report comes."""

    def describe(self) -> str:
        """What runs the target, e.g. "thread running crunch", for logs and leak reports."""
        ...


# Contract violations (a run reported twice, a limiter token given back that was not
# held) are bugs of threadbridge. They are logged and recorded; threadbridge's own test
# suite fails any test during which one happened.
violations: list[str] = []


def violation(message: str) -> None:
    violations.append(message)
    logger.error("internal error, please report it: %s", message)


class Run:
    """The state of one call: its ladder, its outcome, its limiter token, its waiters.

    Backends see it through ``attach()``, ``report()`` and ``release()``; the public
    ``Handle`` and the loop layer see the rest.
    """

    __slots__ = (
        "__weakref__",
        "_lock",
        "_outcome",
        "_release_error",
        "_rung",
        "_scheduler",
        "_stage",
        "_timer",
        "_work",
        "attached",
        "limiter",
        "link",
        "name",
        "policy",
        "settled",
        "waiters",
    )

    def __init__(
        self,
        name: str,
        policy: Policy,
        link: Link,
        limiter: Limiter,
        scheduler: Scheduler = SCHEDULER,
    ) -> None:
        self._lock = threading.Lock()
        self.name = name
        self.policy = policy
        self.link = link
        self.limiter = limiter
        self._scheduler = scheduler
        self._stage = Stage.RUNNING
        self._rung = Rung.NONE
        self._outcome: Outcome | None = None
        self._work: Work | None = None
        self.attached = False  # the backend has handed the target over: it reports the end
        self._timer: Timer | None = None
        self._release_error: BaseException | None = None
        self.settled = False  # loop thread only (see _loop.Waitable)
        self.waiters: Any = None

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def rung(self) -> Rung:
        return self._rung

    def __repr__(self) -> str:
        return f"<threadbridge run {self.name} {self._stage.name}>"

    # --- the ladder -------------------------------------------------------------------

    def cancel(self) -> None:
        """Rung 1 now, and the later rungs on the scheduler. Any thread; idempotent."""
        with self._lock:
            if self._rung or self._stage is not Stage.RUNNING:
                return
            self._rung = Rung.STOP
            work = self._work
        if work is not None:
            work.request_stop()  # first, so that rung 2 never comes before it
        grace = effective_graces(self.policy)[0]
        with self._lock:
            if self._stage is Stage.RUNNING:
                self._timer = self._scheduler.call_later(grace, self._rung2)

    def _rung2(self) -> None:
        policy = self.policy
        grace, interrupt_grace = effective_graces(policy)
        with self._lock:
            if self._stage is not Stage.RUNNING:
                return
            work = self._work
            if policy.interrupt:
                self._rung = Rung.INTERRUPT
            delay = interrupt_grace if policy.interrupt else 0.0
            self._timer = self._scheduler.call_later(delay, self._rung3) if policy.force else None
        if policy.interrupt and work is not None and work.interrupt():
            logger.info(
                "%s ignored its token for %ss; interrupting it (rung 2)", work.describe(), grace
            )

    def hurry(self) -> None:
        """Ctrl-C again while the ladder climbs: skip the rest of the graces. Rung 3 now,
        or, where the policy has no rung 3, rung 2 now if it has not come yet."""
        with self._lock:
            if self._stage is not Stage.RUNNING or not self._rung:
                return
            timer, self._timer = self._timer, None
            rung = self._rung
        if timer is not None:
            timer.cancel()
        if self.policy.force:
            self._rung3()
        elif rung < Rung.INTERRUPT:
            self._rung2()

    def _rung3(self) -> None:
        with self._lock:
            if self._stage is not Stage.RUNNING:
                return
            self._rung = Rung.FORCE
            self._timer = None
            work = self._work
        if work is not None:
            work.force()

    # --- from the backend ---------------------------------------------------------------

    def attach(self, work: Work) -> None:
        """The backend has started the target as ``work`` (or replaced what stood for it);
        a stop requested before this reaches it now."""
        with self._lock:
            self.attached = True
            if self._stage is not Stage.RUNNING:
                return
            self._work = work
            early = self._rung >= Rung.STOP
        if early:
            work.request_stop()

    def report(
        self,
        ending: Ending,
        outcome: Outcome | None = None,
        *,
        interrupted: bool = False,
        release: bool = True,
        hand_back: bool = True,
    ) -> None:
        """The target ended, never started, or was given up on. Once, from any thread.

        ``release`` says whether to give the run's limiter token back now: yes when what
        ran the target (a thread, a worker) is free again. An abandoned thread still runs:
        the backend calls ``release()`` once it really ends.

        ``hand_back=False``: the caller calls ``hand_back()`` itself, once it has dropped
        its own references to the outcome (the awaiter may run on from then on, and
        expects nothing of the call to be alive once it has the result).
        """
        with self._lock:
            if self._stage is not Stage.RUNNING:
                violation(f"{self.name}: reported {ending.value} after it settled as {self._stage}")
                return
            stage = decide_stage(ending, interrupted=interrupted, rung=self._rung)
            self._outcome = outcome if ending is Ending.ENDED else None
            self._stage = stage
            timer, self._timer = self._timer, None
            self._work = None  # nothing of the backend's is kept past settling
        if timer is not None:
            timer.cancel()
        _stats.count_stage(stage)
        if hand_back:
            del outcome
            self.hand_back(release=release)

    def hand_back(self, *, release: bool = True) -> None:
        """Wake whoever awaits the settled run (and give the limiter token back)."""
        self.link.call(self._loop_free_and_wake if release else self._loop_wake)

    def release(self) -> None:
        """An abandoned target has really ended now: give its limiter token back."""
        self.link.post(self._loop_free_later)

    def _loop_free(self) -> BaseException | None:
        # Runs as a loop callback, where an exception would take the whole loop down
        # (trio turns it into TrioInternalError): it is returned instead.
        try:
            self.limiter.release_on_behalf_of(self)
        except Exception as exc:
            if isinstance(exc, RuntimeError):  # what a capacity limiter says when not held
                violation(f"{self.name}: gave back a limiter token that it did not hold")
            return exc
        return None

    def _loop_free_later(self) -> None:
        error = self._loop_free()
        if error is not None:  # nobody awaits an abandoned run any more: say it here
            logger.error("%s: the limiter refused its token back: %r", self.name, error)

    def _loop_wake(self) -> None:
        self.link.wake(self)

    def _loop_free_and_wake(self) -> None:
        self._release_error = self._loop_free()  # raised to whoever awaits the result
        self.link.wake(self)

    # --- for the handle -----------------------------------------------------------------

    def take(self) -> tuple[Outcome | None, BaseException | None]:
        """Move the outcome (and the limiter's refusal, if any) out of the settled run, to
        the one who awaits it: the run no longer keeps the result alive, although the
        thread that handed it back may still hold the run for a moment."""
        taken = (self._outcome, self._release_error)
        self._outcome = self._release_error = None
        return taken

    def result(self) -> Any:
        """The result of a settled run, or its exception, taken out of it (once)."""
        return self.settle(*self.take())

    def settle(self, outcome: Outcome | None, error: BaseException | None) -> Any:
        """What awaiting a run that settled with ``outcome`` gives (see ``take()``)."""
        if error is not None:
            if outcome is not None and not outcome[0] and error.__context__ is None:
                # As if given back in a `finally:` while the target's exception was on
                # its way out (trio's to_thread does so).
                error.__context__ = outcome[1]
            raise error
        if outcome is None:
            stage = self._stage
            if stage is Stage.ABANDONED or stage is Stage.KILLED:
                raise TargetCancelled(f"{self.name} was {stage.value} (rung 3)")
            raise TargetCancelled(f"{self.name} was stopped before it started")
        ok, value = outcome
        if ok:
            return value
        raise value
