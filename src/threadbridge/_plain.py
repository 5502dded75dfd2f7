"""Calls that no event loop awaits: the engines behind ``Executor`` and ``call()``.

A call is a ``Run`` (the ladder's state) whose ``Link`` settles a ``Future`` when the run
settles. Two engines:

* ``ThreadCore`` (threads): no event loop at all. What the run posts runs at once in the
  thread that posts it, and the future is settled from the pool thread that ran the
  target: the stdlib's two thread hand-offs per call, and nothing more.
* ``LoopCore`` (worker processes, Ray, any other backend): the calls start and are
  watched in an event loop of the engine's own, in a thread (``_loop._private``).

Both limit how many calls run at once (the rest wait, in order), and keep every call not
yet settled, for ``shutdown()``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures._base import RUNNING
from typing import TYPE_CHECKING, Any, cast

from . import _locks, _otel, _stats
from ._api import launch
from ._backend import Backend
from ._callables import name_of
from ._future import Future
from ._ladder import Ending, Limiter, Run, Rung, Waiting, Work
from ._loop import Link
from ._policy import Policy, Stage
from ._target import Outcome
from ._thread import OWN_CONTEXT, ThreadBackend, ThreadWork

if TYPE_CHECKING:
    from ._loop import Waitable
    from ._loop._private import LoopThread

# Whether this interpreter runs with the GIL (a free-threaded build may, but one that
# starts without it can only turn it on later, not off): some steps of a call's end are
# safe without a lock only under it (see ThreadCore.ended_plain).
_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()
_GONE = object()  # what live.pop() returns for a future it no longer has

logger = logging.getLogger("threadbridge")

_modules = sys.modules


def stop(future: Future[Any]) -> None:
    """Cancel the call and wait until it has stopped; Ctrl-C meanwhile skips the graces
    (also one that lands while the call is being cancelled: it used to escape, and the
    call was left to climb its graces)."""
    while True:
        try:
            future.cancel()  # again after a Ctrl-C: a no-op once it has done its part
            future._wait_stopped_here()
            return
        except KeyboardInterrupt:
            run = future._run
            if run is not None:
                run.cancel()  # rung 1, if the Ctrl-C came before cancel() got to it
                run.hurry()


class _NoLoop:
    """The ``key`` of Links that are no event loop."""

    __slots__ = ("__weakref__",)


_NO_LOOP = _NoLoop()


class _Full(Exception):
    """What a thread engine's limiter would raise when full (never: it queues itself)."""


class _NoLoopLink:
    """The Link of the thread calls that no event loop awaits: a ``ThreadCore`` is the
    one Link of all its runs (no object more per call), and a run's future is its
    ``waiters``.

    What a run posts runs at once, in the thread that posts it (the reporting pool
    thread, the ladder's scheduler); waking it settles its future, there too.
    """

    __slots__ = ()
    would_block: tuple[type[Exception], ...] = (_Full,)
    protects_from_ki = False
    key: object = _NO_LOOP
    portal: Link | None = None  # no event loop runs the call (from_thread has none to call)

    def post(self, fn: Callable[[], object]) -> bool:
        fn()
        return True

    def call(self, fn: Callable[[], object]) -> bool:
        fn()
        return True

    def is_current(self) -> bool:
        return False

    def checkpoint_if_cancelled(self) -> Awaitable[None]:  # pragma: no cover - never awaited
        raise RuntimeError("this call has no event loop")

    async def wait_settled(self, run: Waitable) -> None:  # pragma: no cover - never awaited
        raise RuntimeError("this call has no event loop; wait on its future")

    def wake(self, run: Waitable) -> None:
        run.settled = True
        # Let go of the future (which holds the run): no reference cycle is left for the
        # garbage collector, and the result goes with the future.
        future, run.waiters = run.waiters, None
        future._settle(run)
        self.ended(future)

    if TYPE_CHECKING:  # the engine's (Core.ended)

        def ended(self, future: Future[Any]) -> None: ...

    def start_task(self, fn: Callable[[], Awaitable[None]], name: str) -> bool:
        return False

    def watch_readable(self, fd: int, on_readable: Callable[[], bool], name: str) -> bool:
        return False

    def unwatch(self, fd: int) -> None:
        pass

    def on_close(self, fn: Callable[[], None], name: str) -> None:
        pass

    def protect_from_ki(self, fn: Any) -> Any:
        return fn


class _Queued(Waiting):
    """The ladder's Work while a thread call waits for a free place: a stop withdraws
    it, and it never runs (COOPERATIVE)."""

    __slots__ = ("core",)
    waiting_for = "a free worker"

    def __init__(self, core: ThreadCore, run: Run) -> None:
        super().__init__(run)
        self.core = core

    def request_stop(self) -> None:
        self.core.withdraw(self.run)


def _unpack(future: Future[Any]) -> tuple[Run, Any]:
    """The run and the job of a prepared call (from then on the future keeps the run)."""
    run, job = future._run, future._job
    assert run is not None
    del future._job
    return run, job


class Core:
    """What both engines share: the calls not yet settled, and shutting down."""

    backend: Backend
    #: At the exit of the interpreter: cancel what still runs (call()'s engines, whose
    #: callers are gone by then), or wait for it (an executor's, as the stdlib's).
    cancel_at_exit = False

    def __init__(self, limit: float, policy: Policy) -> None:
        self.limit = limit
        self.policy = policy
        self.live: dict[Future[Any], None] = {}
        self.shut = _exiting
        self.keep_open = False  # shut down at exit: the loops and pools end later
        _all.add(self)

    @property
    def lock(self) -> threading.Lock:
        """What guards ``live``, ``shut`` and the engine's own counts."""
        raise NotImplementedError

    @property
    def idle(self) -> threading.Condition:
        """Notified when ``live`` empties; waited on under ``with self.lock:``, never
        entered itself (see _locks)."""
        raise NotImplementedError

    def refuse(self) -> RuntimeError:
        if _exiting:
            return RuntimeError("cannot schedule new futures after interpreter shutdown")
        return RuntimeError("cannot schedule new futures after shutdown")

    def _admit(self, future: Future[Any], run: Run) -> None:
        """Under ``lock``: refuse the prepared call if shut down, else count it live."""
        if self.shut:
            refused = self.refuse()
            run.dropped(refused)
            raise refused
        self.live[future] = None

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], policy: Policy | None
    ) -> Future[Any]:
        future = self.prepare(fn, args, policy)
        self.begin(future)
        return future

    def prepare(
        self, fn: Callable[..., Any], args: tuple[Any, ...], policy: Policy | None
    ) -> Future[Any]:
        """The call's future and run, nothing started (what cannot be done fails here)."""
        raise NotImplementedError

    def begin(self, future: Future[Any]) -> None:
        """Start the prepared call, or queue it."""
        raise NotImplementedError

    def interrupted(self, future: Future[Any]) -> None:
        """Ctrl-C reached the caller somewhere in ``begin()`` or after: stop the call if
        it started, forget it if it never will, and wait until it has stopped."""
        run = future._run
        assert run is not None
        if run.attached:
            stop(future)
            return
        # begin() never got as far as handing it over: nothing runs, nothing will.
        with self.lock:
            forgotten = self.live.pop(future, _GONE) is not _GONE
            if forgotten and not self.live and self.shut:
                self.idle.notify_all()

    def ended(self, future: Future[Any]) -> None:
        """A call has settled (stopped, or been given up on at rung 3)."""
        with self.lock:
            if self.live.pop(future, _GONE) is _GONE:
                return  # forgotten by interrupted(): it never started
            last = not self.live and self.shut
            if last:
                self.idle.notify_all()
        if last and not self.keep_open:
            self.closed()

    def closed(self) -> None:
        """Shut down, and no call is left: let go of what the engine holds."""

    def shutdown(self, wait: bool, cancel_futures: bool, *, close: bool = True) -> None:
        with self.lock:
            self.shut = True
            live = list(self.live) if cancel_futures else []
            empty = not self.live
        for future in live:
            future.cancel()
        del live
        if not close:  # the interpreter is exiting: its own hooks end the loops and pools
            self.keep_open = True
        elif empty:
            self.closed()
        if wait:
            with self.lock:
                while self.live:
                    self.idle.wait()
            if close:
                self.wait_closed()

    def wait_closed(self) -> None:
        """After ``closed()``: wait until what the engine held is gone."""

    def forked(self) -> None:
        """In a fork's child, whose one thread is the one that forked: every call not
        settled at the fork runs (or waits for its place) in the parent, never here;
        each one's future is settled with an error that says so, and the call forgotten
        (else ``shutdown(wait=True)``, and the child's exit, would wait for it for ever)."""
        for future in self.live:
            future._left_in_parent()
        self.live = {}

    def dropped(self) -> None:
        """Its executor was dropped without ``shutdown()``: no more calls, nothing
        waited for. Run by a finalizer, so anywhere: in a garbage collection, in the
        middle of any thread's locked step."""
        self.shutdown(False, False)


# Every engine, for the exit: as with the stdlib's executors, the calls submitted before
# the program ends run to their end (or their ladder's, if cancelled) before it exits,
# and nothing new starts after.
_all: weakref.WeakSet[Core] = weakref.WeakSet()
_exiting = False


def _at_exit() -> None:
    global _exiting
    _exiting = True
    for core in list(_all):
        # No closing here: starting threads may be refused by now (3.12), and the
        # loops and pools end in the interpreter's atexit hooks, as they always have.
        core.shutdown(wait=True, cancel_futures=core.cancel_at_exit, close=False)


def _forked() -> None:
    for core in list(_all):
        core.forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


# Before the interpreter joins its threads and runs atexit (so, before the engines' own
# loops end): where the stdlib's executors wait for their work too.
try:
    threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
except RuntimeError:  # imported while the interpreter is exiting: nothing will start
    _exiting = True


class ThreadCore(Core, _NoLoopLink):
    """Thread calls: at most ``limit`` running, the rest queued in order.

    It is the Link of its runs (see ``_NoLoopLink``) and their limiter: a run gives its
    place back (``release_on_behalf_of``) once its thread is free, in that thread, and the
    next queued call starts there.
    """

    backend: ThreadBackend

    def __init__(self, backend: ThreadBackend, limit: float, policy: Policy) -> None:
        super().__init__(limit, policy)
        self.backend = backend
        # Its lock is the pool's (a call is admitted and handed to a pool thread in one
        # locked step); the pool is the same object for good, its lock new in a fork's
        # child.
        self.pool = backend.pool
        self._idle: threading.Condition | None = None
        self.in_use = 0
        self.queue: dict[Run, tuple[Future[Any], object]] = {}

    @property
    def lock(self) -> threading.Lock:
        return self.pool.lock

    @property
    def idle(self) -> threading.Condition:
        # Made at the first use, under the lock (as every use is), and again for the
        # pool's new lock in a fork's child.
        lock = self.pool.lock
        idle = self._idle
        if idle is None or idle._lock is not lock:  # type: ignore[attr-defined]
            idle = self._idle = threading.Condition(lock)
        return idle

    def forked(self) -> None:
        # The pool, in the child, has no threads and a new lock (its own fork hook): the
        # places of the parent's calls are free, and its queued calls are the parent's.
        super().forked()
        self.queue = {}
        self.in_use = 0

    def dropped(self) -> None:
        # Not shutdown(): its lock is the thread pool's, which the thread this runs in
        # may hold (a garbage collection in one of its locked steps), and would wait for
        # itself. Nothing needs the lock here: no call can come any more (the executor
        # is gone), and nobody waits for its calls (shutdown(wait=True) would have kept
        # it alive); the calls still running end as they would, and are forgotten then.
        self.shut = True

    def _new(
        self, fn: Callable[..., Any], args: tuple[Any, ...], policy: Policy | None
    ) -> tuple[Future[Any], Run, object]:
        future: Future[Any] = Future()
        # This engine is its runs' Link and limiter (no cast: every call's path).
        run = future._run = Run(name_of(fn), policy or self.policy, self, self)  # type: ignore[arg-type]
        run.waiters = future  # until the run settles it (see _NoLoopLink)
        # A fresh, empty context per call, as a new thread has: nothing a target sets
        # leaks into the next one on the same thread.
        return future, run, (fn, args, contextvars.Context())

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], policy: Policy | None
    ) -> Future[Any]:
        # A call with a place free, the executor's policy and no span: it starts without
        # its run, which is made if it is cancelled (see ensure_run()); most calls end by
        # themselves, and the run, its report and its hand-back cost as much as the rest.
        # (No span: opentelemetry not imported, or no tracer provider set.)
        if (
            policy is None
            and self.in_use < self.limit
            and (_otel.TRACE not in _modules or not _otel.tracing())
        ):
            future: Future[Any] = Future()
            future._state = RUNNING  # nobody else has it yet: no lock
            pool = self.pool
            # An empty context as it starts, as a new thread has (see _new()): the pool
            # thread's own, kept empty (no span to make current there: see above).
            work = ThreadWork(pool, None, fn, args, OWN_CONTEXT, self)
            work.owner = future
            future._work = work
            try:
                if pool.submit(work, self):
                    return future
            except BaseException:
                self._not_submitted(future, work)
                raise
            # No place free after all: queued, with its run, as below.
            work.plain = work.owner = None
            del work, future
        # prepare() and begin() in one: the job is handed over directly.
        future, run, job = self._new(fn, args, policy)
        self._begin(future, run, job)
        return future

    def admit_plain(self, work: ThreadWork) -> bool:
        """Under the pool's lock, as the pool takes ``work``: whether it has a place (it
        holds it from now on, and is live), or must queue; refused if shut down."""
        if self.shut:
            raise self.refuse()
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        self.live[work.owner] = None
        return True

    def _not_submitted(self, future: Future[Any], work: ThreadWork) -> None:
        """Submitting a call without its run raised (refused, a thread that could not
        start, Ctrl-C): forget it if no thread took it, else stop it."""
        with self.lock:
            admitted = future in self.live
        if not admitted:  # refused (or interrupted before it was admitted): nothing ran
            work.plain = work.owner = None
        elif self.pool.withdraw(work):  # it never runs: its place and its record go
            work.plain = work.owner = None
            self.release_on_behalf_of(work)
            self.ended(future)
        else:  # a thread took it (Ctrl-C landed after the hand-over): it is stopped
            run = self.ensure_run(work)
            if run is not None:
                run.cancel()

    def ensure_run(self, work: ThreadWork) -> Run | None:
        """The run of a call started without one, made now (its future's cancel, or
        ``running()``, needs it); None if the call has ended by itself meanwhile."""
        with work.lock:  # against the end of the target (its run_target()'s last step)
            run = work.run_
            # Ended (started, no longer running; or withdrawn before it started): none
            # is made then, and ThreadWork.run() reads run_ after that step, unlocked.
            if run is not None or work.plain is None or (work.started and not work.running):
                return run
            future = work.owner
            run = work.run_ = Run(work.name, self.policy, self, self)  # type: ignore[arg-type]
            run.waiters = future  # see _NoLoopLink
            future._run = run
        run.attach(work)  # the work reports to it from now on
        return run

    def ended_plain(self, work: ThreadWork, box: list[Outcome]) -> None:
        """In the pool thread: a call that never needed its run has ended. In one
        locked step (the pool's lock is this engine's), its thread is counted free, its
        FINISHED stage counted, its place given back (or taken by the next queued call);
        then its future is settled; then the call is forgotten (under the GIL without
        the lock, unless the engine is shut down): ``shutdown(wait=True)`` returns only
        once every future is done. The next queued call, if any, starts last, here."""
        future = work.owner
        work.owner = None  # the future keeps the work (for its repr), not the reverse
        queue = self.queue
        # In the pool thread, the target done: no exception lands here, and the lock is
        # taken and given back by hand (see _locks).
        lock = self.pool.lock
        lock.acquire()
        try:
            self.pool.finished_locked(work)
            after: Run | None = None
            if queue:
                after = first = next(iter(queue))
                following, job = queue.pop(first)
            else:
                self.in_use -= 1
        finally:
            lock.release()
        if _stats.waiters:  # changed()'s first test, inline (see ThreadPool.finished)
            _stats.changed()
        ok, value = box.pop()
        if ok:
            result = [value]
            del value  # the future alone holds it once a waiter can run
            future._set_result_from(result)
        else:
            future.set_exception(value)
            del value
        live = self.live
        if _GIL:
            # Forgotten without the lock: under the GIL the pop is one step (a future
            # hashes and compares by identity: no Python code runs in it), and shut is
            # read after it, as shutdown() sets shut before it reads live: either
            # shutdown() sees the future gone, or this sees shut and wakes it.
            live.pop(future, None)
            last = self.shut
        else:
            last = True  # (without the GIL that argument needs the lock: see below)
        if last:
            lock.acquire()  # by hand, as above
            try:
                live.pop(future, None)  # (else forgotten by interrupted(): never started)
                last = not live and self.shut
                if last:
                    self.idle.notify_all()
            finally:
                lock.release()
        del future
        if after is not None:  # the next queued call takes the place
            self._start_next(after, following, job)
        if last and not self.keep_open:
            self.closed()

    def prepare(
        self, fn: Callable[..., Any], args: tuple[Any, ...], policy: Policy | None
    ) -> Future[Any]:
        future, _, job = self._new(fn, args, policy)
        future._job = job
        return future

    def begin(self, future: Future[Any]) -> None:
        self._begin(future, *_unpack(future))

    def _begin(self, future: Future[Any], run: Run, job: object) -> None:
        with self.lock:
            self._admit(future, run)
            if self.in_use >= self.limit:
                run.attach(_Queued(self, run))
                self.queue[run] = (future, job)
                return
            self.in_use += 1
        # Nobody else has the future yet: it turns RUNNING without its lock.
        future._state = RUNNING
        self.start(run, job)

    def start(self, run: Run, job: object) -> None:
        """Start a call that holds a place."""
        try:
            self.backend.start(run, job)
        except BaseException:
            if run.attached:
                # Interrupted after the hand-over (Ctrl-C lands between any two steps of
                # the main thread): the target may run. The ladder stops it.
                run.cancel()
            else:  # nothing started, nothing reported: end it here
                run.report(Ending.NOT_STARTED)
            raise

    def withdraw(self, run: Run) -> None:
        """A queued call was cancelled: it leaves the queue and never runs."""
        with self.lock:
            entry = self.queue.pop(run, None)
        if entry is not None:
            run.report(Ending.NOT_STARTED, release=False)  # it held no place

    def release_on_behalf_of(self, borrower: object) -> None:
        """A run's place is free: the next queued call takes it, started here."""
        with self.lock:
            if not self.queue:
                self.in_use -= 1
                return
            run = next(iter(self.queue))
            future, job = self.queue.pop(run)
        self._start_next(run, future, job)

    def _start_next(self, run: Run, future: Future[Any], job: object) -> None:
        """Start a queued call that has taken a place given back."""
        future._mark_running()
        try:
            self.start(run, job)
        except Exception:  # reported on its future; this thread carries on
            logger.debug("threadbridge: could not start %s", run.name, exc_info=True)


class _LoopCallLink:
    """The Link of one call in an engine's own event loop: the loop's Link, whose
    ``wake`` also settles the call's future."""

    __slots__ = ("core", "future", "portal")

    def __init__(self, core: LoopCore, future: Future[Any], loop: Link) -> None:
        self.core = core
        self.future: Future[Any] | None = future  # until it is settled
        self.portal = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self.portal, name)

    def wake(self, run: Waitable) -> None:
        self.portal.wake(run)  # whoever waits in the loop (a closing pool)
        future, self.future = self.future, None  # no reference cycle left (see CallLink)
        assert future is not None  # woken once
        future._settle(cast(Run, run))
        self.core.ended(future)


class _Posted(Waiting):
    """The ladder's Work of a call on its way to the engine's loop: a stop before it
    gets there keeps it from starting (the run remembers its rung, and ``_launch()``
    reads it)."""

    __slots__ = ()
    waiting_for = "its event loop"


class _Started(Backend):
    """A backend seen through one engine: a call's future turns RUNNING as it starts."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.may_wait_to_start = inner.may_wait_to_start

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> object:
        return self.inner.prepare(func, args, name)

    def not_ready(self, link: Link) -> bool:
        return self.inner.not_ready(link)

    async def ready(self, link: Link) -> None:
        await self.inner.ready(link)

    def start(self, run: Run, job: Any) -> Work:
        future, inner_job = job
        future._mark_running()
        return self.inner.start(run, inner_job)

    def default_limit(self) -> int:
        return self.inner.default_limit()


class LoopCore(Core):
    """Calls on a backend that needs an event loop: started and watched in a loop of
    the engine's own. A backend that is an async context manager (a ``ProcessPool``) is
    entered there first, and left once the engine is shut down and its calls settled."""

    left_behind = False  # in a fork's child: the engine is the parent's (see forked())

    def __init__(
        self, backend: Backend, limit: float, policy: Policy, name: str, what: str
    ) -> None:
        from ._loop._private import LoopThread
        from ._loop._waits import new_limiter

        super().__init__(limit, policy)
        self._lock = _locks.Lock()
        self._idle = threading.Condition(self._lock)
        self.backend = backend
        self.started = _Started(backend)
        self.thread: LoopThread = LoopThread(name)
        self.entered = False
        try:
            self.limiter: Limiter = self.thread.run(lambda: new_limiter(limit))
            if hasattr(backend, "__aenter__"):
                self.thread.run(backend.__aenter__)
                self.entered = True

            async def check() -> None:  # in the loop: a pool checks that it is its own
                backend.check_platform(what)

            self.thread.run(check)
        except BaseException:
            self.thread.close_soon()
            self.thread.join()
            raise

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    @property
    def idle(self) -> threading.Condition:
        return self._idle

    def forked(self) -> None:
        # Its loop thread, and the workers that loop started, are the parent's: nothing
        # is started here any more (refused, with the reason), and nothing of the
        # parent's is closed.
        super().forked()
        self._lock = _locks.Lock()  # a thread of the parent may have held it
        self._idle = threading.Condition(self._lock)
        self.shut = self.left_behind = True

    def refuse(self) -> RuntimeError:
        if self.left_behind:
            return RuntimeError(
                "this Executor was made before the process forked: its event loop and its "
                "workers are the parent process's; make a new Executor in this process"
            )
        return super().refuse()

    def prepare(
        self, fn: Callable[..., Any], args: tuple[Any, ...], policy: Policy | None
    ) -> Future[Any]:
        name = name_of(fn)
        job = self.backend.prepare(fn, args, name)  # what cannot travel fails here, at the call
        future: Future[Any] = Future()
        loop = self.thread.link
        run = future._run = Run(
            name, policy or self.policy, cast(Link, _LoopCallLink(self, future, loop)), self.limiter
        )
        future._job = job
        run.attach(_Posted(run))  # until it starts in the loop: a stop keeps it from starting
        return future

    def begin(self, future: Future[Any]) -> None:
        run, job = _unpack(future)
        with self.lock:
            self._admit(future, run)
        if not self.thread.link.post(lambda: self._launch(run, (future, job))):
            with self.lock:
                del self.live[future]
            error = RuntimeError("the executor's event loop has ended; make a new Executor")
            run.dropped(error)
            raise error

    def interrupted(self, future: Future[Any]) -> None:
        run = future._run
        assert run is not None

        # Whether begin() posted the launch or not, this comes after it in the loop: a
        # call that no launch reached ends here (once: a second post finds it ended).
        def never_launched() -> None:
            if not future._launched and run.stage is Stage.RUNNING:
                run.report(Ending.NOT_STARTED, release=False)

        hurry = False
        while True:
            # Another Ctrl-C may land anywhere in here (the main thread runs signal
            # handlers between any two steps): it skips the graces, and the call is
            # still stopped and waited for (stop() guards its own wait).
            try:
                future.cancel()  # a launch on its way finds it stopped, and reports it
                posted = self.thread.link.post(never_launched)
                break
            except KeyboardInterrupt:
                hurry = True
        if not posted:
            return  # the loop has ended: it ended the call
        if hurry:
            run.hurry()
        stop(future)

    def _launch(self, run: Run, job: tuple[Future[Any], object]) -> None:
        """In the engine's loop: start the call, or queue it for its limiter (unless it
        was stopped on its way here: then it never starts)."""
        job[0]._launched = True
        if run.rung >= Rung.STOP:
            run.report(Ending.NOT_STARTED, release=False)
            return
        try:
            launch(run, self.started, job)
        except BaseException as exc:
            # Starting failed (its place went back): the call ends with that error.
            if run.stage is Stage.RUNNING:
                run.report(Ending.ENDED, (False, exc), release=False)
            if not isinstance(exc, Exception):
                raise

    def closed(self) -> None:
        if self.left_behind:
            return  # the parent's loop, not ours to end
        backend = self.backend
        before: Callable[[], Awaitable[None]] | None = None
        if self.entered:

            async def leave() -> None:
                await backend.__aexit__(None, None, None)  # type: ignore[attr-defined]

            before = leave
        self.thread.close_soon(before)

    def wait_closed(self) -> None:
        self.thread.join()
