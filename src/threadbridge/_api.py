"""run_killable() and spawn(): checking what the caller gave, and starting the work."""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, cast

import anyio

from ._backend import Backend, BackendName, _resolved, resolve
from ._callables import ASYNC_CODE, check_func, name_of
from ._handle import Handle
from ._ladder import Ending, Limiter, Run, Waiting
from ._loop import Link, current_link
from ._loop._waits import Canceller, run_cancellable
from ._policy import DEFAULT_POLICY, Policy, Stage, chosen_policy
from ._public import export

if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:
    from typing_extensions import TypeVarTuple, Unpack

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
_FUNCTION = types.FunctionType

# The default limiters of each running loop, keyed by the loop (asyncio) or the run's
# token (trio), so that they go away with it; one per backend.
_limiters: weakref.WeakKeyDictionary[object, dict[Backend, anyio.CapacityLimiter]] = (
    weakref.WeakKeyDictionary()
)


def default_limiter(backend: BackendName | Backend = "thread") -> anyio.CapacityLimiter:
    """The limiter used when none is given, one per event loop and backend.

    40 tokens for threads (anyio's default); one per CPU for worker processes. Change
    ``total_tokens`` on it to change the default for the running loop:

        threadbridge.default_limiter("thread").total_tokens = 100

    Raises:
        RuntimeError: called outside an asyncio or trio event loop.
        ValueError: ``backend`` names no backend.
    """
    what = "default_limiter()"
    return _default_limiter(current_link(what), resolve(backend, what))


# The last loop's limiters, for the next call: a WeakKeyDictionary lookup makes a weak
# reference every time. (A dead loop's reference answers None: never mistaken for a new
# loop at the same address.)
_last: tuple[weakref.ref[object], dict[Backend, anyio.CapacityLimiter]] | None = None


def _default_limiter(link: Link, backend: Backend) -> anyio.CapacityLimiter:
    global _last
    key = link.key
    last = _last
    if last is not None and last[0]() is key:
        limiters = last[1]
    else:
        limiters = _limiters.setdefault(key, {})
        _last = (weakref.ref(key), limiters)
    try:
        return limiters[backend]
    except KeyError:  # the loop's first call on this backend (each loop asks in its thread)
        limiter = limiters[backend] = anyio.CapacityLimiter(backend.default_limit())
        return limiter


def _setup(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    backend: object,
    policy: object,
    limiter: object,
    what: str,
) -> tuple[Run, Backend, object]:
    """Check everything the caller gave; make the run (not started yet) and the job."""
    # The common cases of check_func(), resolve() and chosen_policy() inline (every
    # call's path): a plain def, lambda or closure, not async; a backend named before; no
    # policy.
    function = type(func) is _FUNCTION
    if not function or func.__code__.co_flags & ASYNC_CODE or func.__dict__:
        check_func(func, what)
    chosen = _resolved.get(backend) if type(backend) is str else None
    if chosen is None:
        chosen = resolve(backend, what)
    policy = DEFAULT_POLICY if policy is None else chosen_policy(policy, what)
    if limiter is not None:
        if not all(hasattr(limiter, m) for m in _LIMITER_METHODS):
            raise TypeError(
                f"{what}: limiter must be an anyio.CapacityLimiter (or a trio.CapacityLimiter "
                f"under trio, or an object with its {' and '.join(_LIMITER_METHODS)} "
                f"methods) or None, got {limiter!r}"
            )
        if not hasattr(limiter, "acquire_on_behalf_of_nowait"):
            limiter = _WithoutNowait(limiter)
    link = current_link(what)
    if chosen.checks_platform:
        chosen.check_platform(what)
    name = func.__qualname__ if function else name_of(func)
    job = chosen.prepare(func, args, name)
    if limiter is None:
        limiter = _default_limiter(link, chosen)
    return Run(name, policy, link, cast(Limiter, limiter)), chosen, job


# What a limiter must have: trio's documented interface for to_thread.run_sync's limiter.
# acquire_on_behalf_of_nowait() is used where it exists.
_LIMITER_METHODS = ("acquire_on_behalf_of", "release_on_behalf_of")


class _WithoutNowait:
    """A limiter that has no acquire_on_behalf_of_nowait(): every acquire awaits."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def acquire_on_behalf_of_nowait(self, borrower: object) -> None:
        raise anyio.WouldBlock  # both loops' Links take it as "would block"

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.inner.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        self.inner.release_on_behalf_of(borrower)


def _start(run: Run, backend: Backend, job: object) -> None:
    """Start the job; the run holds a limiter token, which goes back if starting fails
    before the backend attached the run's work."""
    try:
        work = backend.start(run, job)
    except BaseException as exc:
        if run.attached:
            # Interrupted after the hand-over (on asyncio a KeyboardInterrupt can land
            # between any two bytecodes): the target may run. The ladder stops it, and
            # the backend reports its end and gives the token back.
            run.cancel()
        else:
            run.limiter.release_on_behalf_of(run)
            run.dropped(exc)
        raise
    if not run.attached:
        run.attach(work)  # a backend that leaves attaching to its caller


async def run_killable(
    func: Callable[[Unpack[Ts]], T],
    /,
    *args: Unpack[Ts],
    backend: BackendName | Backend = "thread",
    policy: Policy | None = None,
    limiter: Limiter | None = None,
) -> T:
    """Run a blocking callable in a thread or a worker process, and really stop it on cancel.

    These two lines are equivalent, except that the second can be stopped:

        result = func(*args)
        result = await run_killable(func, *args)

    Keyword arguments for ``func`` go through ``functools.partial()``.

    Args:
        func: a plain (not async) callable.
        *args: positional arguments for ``func``.
        backend: ``"thread"`` (default), ``"process"`` (the event loop's default
            worker pool), or a backend object.
        policy: how hard to try when stopping; defaults to ``Policy()``.
        limiter: an ``anyio.CapacityLimiter`` (or ``trio.CapacityLimiter`` under trio);
            defaults to ``default_limiter(backend)``: 40 threads, or one worker per CPU,
            per event loop. A thread given up on at rung 3 keeps its token until it
            really ends.

    Returns:
        What ``func`` returned.

    Raises:
        Exception: whatever ``func`` raised, as itself (from a worker process too, or
            as ``RemoteError`` when it cannot travel back).
        TypeError: ``func`` is async or not callable, or (processes) cannot be pickled.
        RuntimeError: called outside an asyncio or trio event loop.
        WorkerCrashed: (processes) the worker died without answering.

    Cancellation:
        When the awaiting task is cancelled, the await is shielded while the work climbs:

        * rung 1, at once: the target's token is set: ``cancel_requested()`` turns true,
          ``check_cancelled()`` and ``sleep()`` raise ``TargetCancelled``.
        * rung 2, after ``policy.grace``: a thread gets ``TargetCancelled`` raised
          inside it, once, outside ``uninterruptible()`` blocks (it cannot land inside a
          blocking C call, and it can leave state torn; see the hazards page); a worker
          process gets SIGTERM, which raises ``TargetCancelled`` in the target, even
          inside ``time.sleep``.
        * rung 3, after ``policy.interrupt_grace``: a thread is abandoned, left running
          as a daemon with its result discarded and counted in ``stats()``; a worker's
          whole process group is SIGKILLed and reaped before the await returns.

        Then the native cancellation (``asyncio.CancelledError``, ``trio.Cancelled``)
        propagates. A rung is skipped when the work has ended by then.
    """
    run, chosen, job = _setup(func, args, backend, policy, limiter, "run_killable()")
    link = run.link
    await link.checkpoint_if_cancelled()
    if chosen.may_wait_to_start and chosen.not_ready(link):
        await chosen.ready(link)
    try:
        run.limiter.acquire_on_behalf_of_nowait(run)
    except link.would_block:
        await run.limiter.acquire_on_behalf_of(run)
    if not link.protects_from_ki:  # asyncio: nothing to protect, so _start_and_wait inline
        _start(run, chosen, job)
        await link.wait_settled(run)
        return run.result()  # type: ignore[no-any-return]
    return await link.protect_from_ki(_start_and_wait)(run, chosen, job)  # type: ignore[no-any-return]


async def _start_and_wait(run: Run, backend: Backend, job: object) -> Any:
    _start(run, backend, job)
    await run.link.wait_settled(run)
    return run.result()


def spawn(
    func: Callable[[Unpack[Ts]], T],
    /,
    *args: Unpack[Ts],
    backend: BackendName | Backend = "thread",
    policy: Policy | None = None,
    limiter: Limiter | None = None,
) -> Handle[T]:
    """Start a blocking callable in a thread or a worker process and return its handle.

    The work starts at once (or as soon as the limiter has room). These two lines are
    equivalent:

        result = await run_killable(func, *args)
        result = await spawn(func, *args)

    Args:
        func: a plain (not async) callable.
        *args: positional arguments for ``func``.
        backend: ``"thread"`` (default), ``"process"``, or a backend object.
        policy: how hard to try when stopping; defaults to ``Policy()``.
        limiter: an ``anyio.CapacityLimiter`` (or ``trio.CapacityLimiter`` under trio);
            defaults to ``default_limiter(backend)`` of the running loop.

    Returns:
        A ``Handle``: ``await`` it for the result, ``cancel()`` or ``await stop()``
        it to stop the work, read ``stage`` to see where it stands.

    Raises:
        TypeError: ``func`` is async or not callable.
        RuntimeError: called outside an asyncio or trio event loop.

    Cancellation:
        Nothing is cancelled by leaving the scope that called ``spawn()``: stop the work
        with ``handle.cancel()`` / ``await handle.stop()``, or by cancelling a task that
        awaits the handle. Then it climbs:

        * rung 1, at once: the target's token is set.
        * rung 2, after ``policy.grace``: ``TargetCancelled`` raised in the thread,
          or SIGTERM to the worker process.
        * rung 3, after ``policy.interrupt_grace``: the thread is abandoned, or the
          worker's process group SIGKILLed and reaped.
    """
    run, chosen, job = _setup(func, args, backend, policy, limiter, "spawn()")
    launch(run, chosen, job)
    return Handle(run)


def launch(run: Run, backend: Backend, job: object) -> None:
    """In the run's loop: start the job now if its limiter has room and its backend is
    ready, else in a background task once they are."""
    if backend.may_wait_to_start and backend.not_ready(run.link):
        _start_when_admitted(run, backend, job)
        return
    try:
        run.limiter.acquire_on_behalf_of_nowait(run)
    except run.link.would_block:
        _start_when_admitted(run, backend, job)
    else:
        _start(run, backend, job)


class _Admission(Waiting):
    """The ladder's Work while a spawned target waits for room in its limiter (or for its
    backend to be ready).

    Cancelling it withdraws the request: the target never runs, and the run ends
    COOPERATIVE (stopped before it started).
    """

    __slots__ = ("canceller",)
    waiting_for = "its limiter"

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        self.canceller = Canceller(run.link)

    def request_stop(self) -> None:
        self.canceller.cancel()


def _start_when_admitted(run: Run, backend: Backend, job: object) -> None:
    """The limiter is full (or the backend not ready): wait in a background task, then
    start."""
    admission = _Admission(run)
    run.attach(admission)

    async def wait_for_room() -> None:
        if backend.may_wait_to_start and backend.not_ready(run.link):
            await backend.ready(run.link)
        await run.limiter.acquire_on_behalf_of(run)

    async def admit() -> None:
        try:
            if await run_cancellable(admission.canceller, wait_for_room):
                _start(run, backend, job)
            else:
                run.report(Ending.NOT_STARTED, release=False)
        except BaseException as exc:
            # The loop is shutting down, or starting failed (its token went back): the
            # run must still end, with that error for whoever awaits it.
            if run.stage is Stage.RUNNING:
                run.report(Ending.ENDED, (False, exc), release=False)
            if not isinstance(exc, Exception):
                raise

    if not run.link.start_task(admit, name=f"threadbridge admission of {run.name}"):
        raise RuntimeError("the event loop is shutting down; no new work can start")


export(run_killable, spawn, default_limiter)
