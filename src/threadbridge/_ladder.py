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
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import _locks, _otel, _stats
from ._errors import TargetCancelled
from ._internal import violation
from ._loop import Link
from ._pickling import NOT_STARTED, RETURNED, Answer
from ._policy import Policy, Stage, effective_graces
from ._scheduler import SCHEDULER, Scheduler, Timer
from ._target import Outcome
from ._where import Snapshot, frame_of

logger = logging.getLogger("threadbridge")

_modules = sys.modules


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


# Enum members read on every call's path, as module constants: on Python 3.10 and 3.11 an
# enum class's attributes are looked up through its metaclass's __getattr__ hook, which
# costs ten times a global's read.
_RUNNING = Stage.RUNNING
_FINISHED = Stage.FINISHED
_ENDED = Ending.ENDED
_NO_RUNG = Rung.NONE
_STOP = Rung.STOP


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

    def interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        """Rung 2. Returns whether it reached a running target (False: it had ended,
        had not started, or rung 2 is not available here). ``announce`` is called once
        it is certain to (a target held off by ``uninterruptible()`` included), before
        the exception can be raised in the target: what it records is there by the time
        the target can have stopped."""
        ...

    def force(self) -> None:
        """Rung 3: give up on a target that is still running, then report ABANDONED or
        KILLED. If it has ended meanwhile, do nothing: its own report comes."""

    def describe(self) -> str:
        """What runs the target, e.g. "thread running crunch", for logs and leak reports."""
        ...


class Waiting:
    """Base of the ladder's Work for a call that has not started (it waits for a place,
    for its limiter, for its event loop): rung 1 is all there is to climb, and what it
    does is the subclass's ``request_stop()``; rungs 2 and 3 have nothing to reach."""

    __slots__ = ("run",)
    waiting_for = "its start"

    def __init__(self, run: Run) -> None:
        self.run = run

    def request_stop(self) -> None:
        pass

    def interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        return False

    def force(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.run.name} (waiting for {self.waiting_for})"


class Run:
    """The state of one call: its ladder, its outcome, its limiter token, its waiters.

    Backends see it through ``attach()``, ``report()`` and ``release()``; the public
    ``Handle`` and the loop layer see the rest.
    """

    __slots__ = (
        "__weakref__",
        "_backend",
        "_cancelled_at",
        "_lock",
        "_outcome",
        "_pid",
        "_release_error",
        "_rung",
        "_scheduler",
        "_span_kept",
        "_stack",
        "_stage",
        "_timer",
        "_work",
        "attached",
        "limiter",
        "link",
        "name",
        "policy",
        "settled",
        "span",
        "waiters",
        "where",
    )

    def __init__(
        self,
        name: str,
        policy: Policy,
        link: Link,
        limiter: Limiter,
        scheduler: Scheduler = SCHEDULER,
    ) -> None:
        self._lock = _locks.Lock()
        self.name = name
        self.policy = policy
        self.link = link
        self.limiter = limiter
        self._scheduler = scheduler
        self._stage = _RUNNING
        self._rung = _NO_RUNG
        self._outcome: Outcome | None = None
        self._work: Work | None = None
        self.attached = False  # the backend has handed the target over: it reports the end
        self._timer: Timer | None = None
        self._release_error: BaseException | None = None
        self.settled = False  # loop thread only (see _loop.Waitable)
        self.waiters: Any = None
        # Where the target was as rung 2 or 3 fired: its innermost frame, and its stack
        # (formatted, or a snapshot formatted when asked for).
        self.where: str | None = None
        self._stack: str | Snapshot | None = None
        # For the records of the ladder's steps, known once it is cancelled: what runs
        # the target (its Work says), and when rung 1 came.
        self._backend: str | None = None
        self._pid: int | None = None
        self._cancelled_at = 0.0
        # The call's OpenTelemetry span, if the program traces (see _otel): a check of
        # one dict here when it does not.
        self.span: Any = _otel.start(name) if _otel.TRACE in _modules else None

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
            self._cancelled_at = time.monotonic()
            work = self._work
        # Said before the token is set: a target that sees it may end, and its end be
        # recorded, at once.
        if self.span is not None or logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: stop requested (rung 1)", self.name, extra=self.fields("stop", work))
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
            self._timer = None
            rung = self._rung
        if policy.interrupt and work is not None:
            # Said before it is done: once the exception lands, the target may end and
            # its awaiter return at once (at once indeed, where there is no GIL).
            def announce(work: Work = work) -> None:
                logger.info(
                    "%s ignored its token for %ss; interrupting it (rung 2)%s",
                    work.describe(),
                    grace,
                    self.said_where(),
                    extra=self.fields("interrupt", work),
                )

            work.interrupt(announce)
        if policy.force:
            # Rung 3's grace counts from rung 2 issued, not from before whatever issuing
            # it took (a thread's first rung 2 in a process may wait for ctypes to load).
            delay = interrupt_grace if policy.interrupt else 0.0
            with self._lock:
                if self._stage is Stage.RUNNING and self._rung is rung and self._timer is None:
                    self._timer = self._scheduler.call_later(delay, self._rung3)

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

    def seen_at(self, line: str, stack: str | Snapshot) -> None:
        """Where the target was as rung 2 or 3 fired: kept for ``stopped_at``; the
        latest one counts."""
        self.where, self._stack = line, stack

    @property
    def stopped_at(self) -> str | None:
        stack = self._stack
        return stack if stack is None or isinstance(stack, str) else stack.stack()

    def said_where(self) -> str:
        """What the records of rungs 2 and 3 add if it is known where the target was:
        "; it was at app.py:12 in recv()"."""
        return "" if self.where is None else f"; it was at {self.where}"

    def seen_late(self, line: str, stack: str) -> None:
        """Where a remote target was as rung 2 fired, told after the rung's record (by
        its worker at once, and with its answer: the first one told counts)."""
        if self.where is not None:
            return
        self.seen_at(line, stack)
        logger.info("%s was at %s when rung 2 fired", self.name, line, extra=self.fields("where"))

    def fields(self, event: str, work: object = None) -> dict[str, Any]:
        """The ``extra`` of a record of this run's ladder: ``record.threadbridge`` is a
        dict of event, target, backend, rung, stage, elapsed (seconds since rung 1),
        pid, and, once known, where the target was (file, line, function, stack).
        ``work``, if given, is the run's Work: its backend and pid are remembered for
        the later records (the run lets go of its Work as it settles)."""
        if work is not None:
            self._backend = getattr(work, "backend", None) or self._backend
            self._pid = getattr(work, "pid", None) or self._pid
        data: dict[str, Any] = {
            "event": event,
            "target": self.name,
            "backend": self._backend,
            "rung": int(self._rung),
            "stage": self._stage.value,
            "elapsed": time.monotonic() - self._cancelled_at if self._cancelled_at else 0.0,
            "pid": self._pid,
        }
        stack = self.stopped_at
        if stack is not None:
            filename, line, function = frame_of(stack)
            data.update(file=filename, line=line, function=function, stack=stack)
        if self.span is not None:  # each step a record is written for, an event of the span
            _otel.event(self.span, data)
        return {"threadbridge": data}

    def _end_span(self, span: Any, stage: Stage, outcome: Outcome | None, work: object) -> None:
        if stage is _FINISHED:
            # It ended by itself: no attribute to say so (each one the SDK is given
            # costs a tenth of a thread call); an exception it raised is recorded.
            _otel.end(span, None, None, None if outcome is None or outcome[0] else outcome[1])
        else:
            _otel.end(span, stage.value, getattr(work, "backend", None) or self._backend, None)

    def dropped(self, error: BaseException) -> None:
        """The call will never start, and never be reported (refused, or its start
        failed before the backend had it): its span ends with ``error``."""
        span, self.span = self.span, None
        if span is not None:
            _otel.end(span, "not started", None, error)

    def attach(self, work: Work) -> None:
        """The backend has started the target as ``work`` (or replaced what stood for it);
        a stop requested before this reaches it now."""
        with self._lock:
            self.attached = True
            if self._stage is not _RUNNING:
                return
            self._work = work
            early = self._rung >= _STOP
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
            if self._stage is not _RUNNING:
                violation(f"{self.name}: reported {ending.value} after it settled as {self._stage}")
                return
            if ending is _ENDED and not interrupted and not self._rung:
                stage = _FINISHED  # decide_stage()'s answer, inline: every call's path
                self._outcome = outcome
            else:
                stage = decide_stage(ending, interrupted=interrupted, rung=self._rung)
                self._outcome = outcome if ending is _ENDED else None
            self._stage = stage
            timer, self._timer = self._timer, None
            work, self._work = self._work, None  # nothing of the backend's is kept past settling
        if timer is not None:
            timer.cancel()
        with _stats.lock:  # _stats.count_stage(), inline: every call's path
            _stats.stages[stage._value_] += 1
        span = self.span
        if self._cancelled_at and (span is not None or logger.isEnabledFor(logging.DEBUG)):
            logger.debug(
                "%s stopped (%s) %.3fs after rung 1",
                self.name,
                stage.value,
                time.monotonic() - self._cancelled_at,
                extra=self.fields("stopped"),
            )
        if span is not None:
            # No step of the ladder after this is an event of the span. The span itself
            # goes with the outcome, in the awaiter's thread (take()), which made it: the
            # SDK's span has parts large enough for the C library's malloc, which frees
            # at a cost in another thread (1.3k instructions a call, measured).
            self.span = None
            self._span_kept = span
            if stage is _FINISHED and outcome is not None and outcome[0]:
                span.end()  # it returned: nothing to add (_end_span()'s case, inline)
            else:
                self._end_span(span, stage, outcome, work)
            del span
        del work
        if hand_back:
            del outcome
            # hand_back()'s line, inline: this is every call's path.
            self.link.call(self._loop_free_and_wake if release else self._loop_wake)

    def report_answer(self, answer: Answer, *, hand_back: bool = True) -> None:
        """The target's host (a worker process, a remote task) answered: report it.

        ``hand_back=False``: as for ``report()``; the caller drops its answer first.
        """
        how, value, interrupted, where = answer
        del answer
        if where is not None:  # unless the worker has said it already
            self.seen_late(*where)
        if how is NOT_STARTED:
            self.report(Ending.NOT_STARTED, hand_back=hand_back)
            return
        outcome = (how is RETURNED, value)
        del value
        self.report(Ending.ENDED, outcome, interrupted=interrupted, hand_back=False)
        del outcome
        if hand_back:
            self.hand_back()

    def hand_back(self, *, release: bool = True) -> None:
        """Wake whoever awaits the settled run (and give the limiter token back)."""
        self.link.call(self._loop_free_and_wake if release else self._loop_wake)

    def release(self) -> None:
        """An abandoned target has really ended now: give its limiter token back."""
        self.link.post(self._loop_free_later)

    # The _loop_ methods run as loop callbacks, where an exception would take the whole
    # loop down (trio turns it into TrioInternalError): a limiter's refusal to take its
    # token back is kept (see _refused()) instead.

    def _refused(self, exc: Exception) -> Exception:
        if isinstance(exc, RuntimeError):  # what a capacity limiter says when not held
            violation(f"{self.name}: gave back a limiter token that it did not hold")
        return exc

    def _loop_free_later(self) -> None:
        try:
            self.limiter.release_on_behalf_of(self)
        except Exception as exc:
            error = self._refused(exc)
        else:
            return
        # Nobody awaits an abandoned run any more: said here.
        logger.error("%s: the limiter refused its token back: %r", self.name, error)

    def _loop_wake(self) -> None:
        self.link.wake(self)

    def _loop_free_and_wake(self) -> None:
        try:
            self.limiter.release_on_behalf_of(self)
        except Exception as exc:
            self._release_error = self._refused(exc)  # raised to whoever awaits the result
        self.link.wake(self)

    # --- for the handle -----------------------------------------------------------------

    def take(self) -> tuple[Outcome | None, BaseException | None]:
        """Move the outcome (and the limiter's refusal, if any) out of the settled run, to
        the one who awaits it: the run no longer keeps the result alive, although the
        thread that handed it back may still hold the run for a moment."""
        taken = (self._outcome, self._release_error)
        self._outcome = self._release_error = self._span_kept = None
        return taken

    def result(self) -> Any:
        """The result of a settled run, or its exception, taken out of it (once)."""
        outcome, error = self._outcome, self._release_error
        self._outcome = self._release_error = None
        if error is None and outcome is not None and outcome[0]:
            return outcome[1]  # the common case, without a call more
        return self.settle(outcome, error)

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
