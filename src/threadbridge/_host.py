"""The target host: what runs targets away from the driver, one job at a time.

A worker process and a Ray task (and the next remote backend) run their targets with
one ``Host`` each. It keeps the job that runs now (and the stops that came before their
job), runs a job into an ``Answer``, and delivers the rungs the way every remote backend
does: rung 1 sets the job's token, rung 2 is a signal handled in the target's own thread
(so that it ends a blocking call), sent again until its handler has run. A backend
supplies only how a job and its rungs travel to the host, how the answer travels back,
and how rung 3 kills (docs/internals.md, "Adding a backend").

Imported where targets run: it stays light (no anyio, no trio).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import _locks, _otel, _pickling, _signals, _where
from ._errors import TargetCancelled
from ._pickling import NOT_STARTED, RAISED, RETURNED
from ._target import Outcome, TargetState, resend_delays


class HostedJob:
    """One job on its host, from its start to its answer."""

    __slots__ = ("heard", "id", "interrupt_sent", "state", "where")

    def __init__(self, job_id: int, state: TargetState) -> None:
        self.id = job_id
        self.state = state
        self.interrupt_sent = False  # rung 2's signal was sent while it ran
        self.heard = False  # and the host's handler has run since
        self.where: _where.Snapshot | None = None  # where it was as rung 2 was sent


class Host:
    """Runs jobs in the thread that calls ``run()``; takes rungs from any other thread.

    Args:
        signum: the signal that carries rung 2 to the target's thread (its handler is
            installed by ``install()``, in the main thread).
        where: said in the TargetCancelled that rung 2 raises ("by SIGTERM").
        loads: unpickles a job's payload into ``(func, args)``.
        host_name: names the host in errors ("the worker", "the Ray task").
        hint: a reason to add when a payload cannot be unpickled (say, the main script
            failed to import here), or "".
        tell_where: sends ``(job id, (line, stack))``, where the target was as rung 2
            fired, to the driver (called in the thread that delivers rung 2).
    """

    def __init__(
        self,
        signum: int,
        *,
        where: str,
        loads: Callable[[bytes], Any],
        host_name: str,
        hint: Callable[[], str] = str,
        tell_where: Callable[[int, tuple[str, str]], None] | None = None,
    ) -> None:
        self.signum = signum
        # Sends where a job's target was as rung 2 fired to the driver at once (before
        # the answer, which carries it too: a kill at rung 3 leaves no answer).
        self.tell_where = tell_where
        self.message = f"interrupted {where} (rung 2)"
        self.loads = loads
        self.host_name = host_name
        self.hint = hint
        self.pid = os.getpid()  # a target's fork that returns must not act as the host
        self.lock = _locks.Lock()
        self.current: HostedJob | None = None
        self.last_started = 0  # job ids only grow: a stop for an older job is stale
        self.early: set[int] = set()  # jobs whose stop came before they started
        self.handler = self._on_signal  # one bound method, compared by identity
        self.resend = self._resend  # the same, made once: it goes with every job

    def install(self) -> None:
        """Take rung 2's signal (from the main thread)."""
        signal.signal(self.signum, self.handler)

    # --- in the target's thread ------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        job = self.current
        if job is None or not job.interrupt_sent:
            return  # not meant for what runs now (idle, or a job rung 2 was not sent to)
        job.heard = True
        job.state.interrupt_here(self.message)

    def run(
        self,
        job_id: int,
        payload: bytes,
        started: Callable[[HostedJob], None] | None = None,
        trace: dict[str, str] | None = None,
    ) -> bytes:
        """Run one job in this thread; its answer, pickled for the driver. ``started``
        is called with the job once the rungs can reach it, before the target starts.
        ``trace``: the caller's trace context (W3C headers), current while it runs."""
        state = TargetState(_locks.Lock())
        state.resend = self.resend
        with self.lock:
            self.last_started = job_id
            if self.early:
                if job_id in self.early:
                    state._set()  # it will not start
                self.early = {later for later in self.early if later > job_id}
            job = self.current = HostedJob(job_id, state)
        loads, pid = self.loads, self.pid

        def call() -> Outcome:
            try:
                try:
                    func, args = loads(payload)
                except TargetCancelled:
                    raise
                except BaseException as exc:
                    return (False, self._load_error(exc))
                traced = None if trace is None else _otel.enter(trace)
                try:
                    return (True, func(*args))
                except BaseException as exc:
                    return (False, exc)
                finally:
                    if traced is not None:
                        _otel.leave(traced)
            finally:
                if os.getpid() != pid:
                    # The target forked and its child has returned from it: that child
                    # must not go on to answer the driver or take the host's next jobs.
                    os._exit(0)

        try:
            if started is not None:
                started(job)
            outcome = state.run_target(call)
        finally:
            with self.lock:
                self.current = None
        interrupted = state.interrupted or job.interrupt_sent
        # Where rung 2 found it, with the answer too: the answer may leave before the
        # thread that delivered rung 2 has sent it on its own.
        found = job.where
        where = None if found is None else (found.line, found.stack())
        if outcome is None:
            return _pickling.dumps_answer(NOT_STARTED, None, interrupted, where)
        ok, value = outcome
        return _pickling.dumps_answer(RETURNED if ok else RAISED, value, interrupted, where)

    def _load_error(self, exc: BaseException) -> BaseException:
        note = f"{self.host_name} could not unpickle the target or its arguments: {exc}"
        hint = self.hint()
        if hint:
            note += f" ({hint})"
        return _pickling.remote_error(exc, note)

    # --- the rungs, from the thread that hears them -----------------------------------

    def stop(self, job_id: int) -> None:
        """Rung 1: set the job's token (or, if it has not started, never start it)."""
        with self.lock:
            job = self.current
            if job is None or job.id != job_id:
                if job_id > self.last_started:  # sent right after the job, heard before it
                    self.early.add(job_id)
                return
            job.state._set()

    def interrupt(
        self,
        job_id: int,
        send: Callable[[int], None] | None = None,
        announce: Callable[[], None] | None = None,
    ) -> HostedJob | None:
        """Rung 2: the signal for the job, if its target runs (``send(thread_id)`` sends
        it; by default to the target's thread), ``announce()`` called first. Returns the
        job to pass to ``send_again()`` until that returns False, or None if it reached
        nothing."""
        with self.lock:
            job = self.current
            if job is None or job.id != job_id or not job.state.running or job.interrupt_sent:
                return None
            job.interrupt_sent = True
            # Only a snapshot before the signal (its source is read after: rung 2 is not
            # held up by reading files, or by the imports it takes the first time).
            found = job.where = _where.snapshot(job.state.thread_id)
            if announce is not None:
                announce()
            (send or self.resend)(job.state.thread_id)
        if found is not None and self.tell_where is not None:
            self.tell_where(job.id, (found.line, found.stack()))
        return job

    def where_now(self, job_id: int) -> str | None:
        """The stack of the job's target now (None if it does not run, or shows no frame
        of its own)."""
        found = self._snapshot(job_id)
        return None if found is None else found.stack()

    def seen_now(self, job_id: int) -> tuple[str, str] | None:
        """Where the job's target is now, as rung 2 tells it: (line, stack)."""
        found = self._snapshot(job_id)
        return None if found is None else (found.line, found.stack())

    def _snapshot(self, job_id: int) -> _where.Snapshot | None:
        with self.lock:
            job = self.current
            if job is None or job.id != job_id or not job.state.running:
                return None
            thread_id = job.state.thread_id
        return _where.snapshot(thread_id)

    def send_again(self, job: HostedJob) -> bool:
        """Rung 2's signal once more to the target's thread if the handler has not run
        since it was sent (see ``_target.RESEND_FIRST``). Whether to go on: False once
        it was heard, the job has ended, or the target handles the signal itself (that
        is its to take)."""
        with self.lock:
            if job is not self.current or job.heard or not job.state.running:
                return False
            if _signals.getsignal(self.signum) is not self.handler:
                return False
            self.resend(job.state.thread_id)
            return True

    def send_again_until_heard(self, job: HostedJob, ended: Callable[[float], bool]) -> None:
        """``send_again()`` with the pauses of ``resend_delays()`` until it returns False
        or ``ended(pause)`` (which waits up to ``pause`` for the job's end) says the job
        has ended. For a backend whose rungs arrive on a thread of their own."""
        for delay in resend_delays():
            if ended(delay) or not self.send_again(job):
                return

    def _resend(self, thread_id: int) -> None:
        # To the target's thread itself: only a signal delivered to it ends a blocking call.
        signal.pthread_kill(thread_id, self.signum)
