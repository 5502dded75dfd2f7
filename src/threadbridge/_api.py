"""run_killable() and spawn(): checking what the caller gave, and starting the work."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio

from . import _thread
from ._ladder import Handle
from ._loop import AsyncioLink, Link, current_link
from ._policy import DEFAULT_POLICY, Policy, Stage

if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:
    from typing_extensions import TypeVarTuple, Unpack

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

Backend = Literal["thread", "process"]

# anyio's figure for its default thread limiter, which in turn is trio's, which says it
# was pulled out of the air. Threads are cheap; 40 keeps a runaway caller from making
# thousands of them.
DEFAULT_THREAD_LIMIT = 40

# The default limiters of each running loop, keyed by the loop (asyncio) or the run's
# token (trio), so that they go away with it.
_limiters: weakref.WeakKeyDictionary[object, dict[str, anyio.CapacityLimiter]] = (
    weakref.WeakKeyDictionary()
)


def default_limiter(backend: Backend = "thread") -> anyio.CapacityLimiter:
    """The limiter used when none is given, one per event loop and backend.

    40 tokens for threads (anyio's default); one per CPU for worker processes. Change
    ``total_tokens`` on it to change the default for the running loop:

        threadbridge.default_limiter("thread").total_tokens = 100

    Raises:
        RuntimeError: called outside an asyncio or trio event loop.
    """
    return _default_limiter(current_link("default_limiter()"), backend)


def _default_limiter(link: Link, backend: Backend) -> anyio.CapacityLimiter:
    key = link.key
    try:
        return _limiters[key][backend]
    except KeyError:
        total = DEFAULT_THREAD_LIMIT if backend == "thread" else (os.cpu_count() or 1)
        limiter = anyio.CapacityLimiter(total)
        _limiters.setdefault(key, {})[backend] = limiter
        return limiter


def _name_of(func: Callable[..., Any]) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


def _check_func(func: object, what: str) -> None:
    if inspect.iscoroutine(func):
        func.close()
        raise TypeError(
            f"{what} expected a sync function, but got a coroutine object; pass the "
            "function itself (without calling it), and make it a plain `def`"
        )
    if not callable(func):
        raise TypeError(f"{what} expected a callable as its first argument, got {func!r}")
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
        raise TypeError(
            f"{what} expected a sync function, but {_name_of(func)!r} is an async function; "
            "await it directly instead of running it in a thread or a process"
        )


def _check_options(
    backend: object, policy: object, limiter: object, what: str
) -> tuple[Policy, anyio.CapacityLimiter | None]:
    if backend != "thread" and backend != "process":
        raise ValueError(f'{what}: backend must be "thread" or "process", got {backend!r}')
    if policy is None:
        policy = DEFAULT_POLICY
    elif not isinstance(policy, Policy):
        raise TypeError(f"{what}: policy must be a threadbridge.Policy or None, got {policy!r}")
    if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
        raise TypeError(
            f"{what}: limiter must be an anyio.CapacityLimiter or None, got {limiter!r}"
        )
    return policy, limiter


def _prepare(
    backend: Backend, func: Callable[..., Any], args: tuple[Any, ...], what: str
) -> bytes | None:
    """For processes: pickle the job now, so that what cannot travel fails at once."""
    if backend == "thread":
        return None
    from . import _process

    _process.check_platform(what)
    return _process.dumps_job(func, args, _name_of(func))


def _start(
    handle: Handle[Any],
    backend: Backend,
    func: Callable[..., Any],
    args: Any,
    payload: bytes | None,
) -> None:
    if payload is None:
        work = _thread.ThreadWork(handle, func, args)
        handle._start(work)
        _thread.submit(work)
    else:
        from . import _process

        _process.start(handle, handle._link, payload)


def _setup(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    backend: object,
    policy: object,
    limiter: object,
    what: str,
) -> tuple[Link, Handle[Any], bytes | None]:
    """Check everything the caller gave, and make the handle (not started yet)."""
    _check_func(func, what)
    checked_policy, checked_limiter = _check_options(backend, policy, limiter, what)
    link = current_link(what)
    payload = _prepare(backend, func, args, what)  # type: ignore[arg-type]
    if checked_limiter is None:
        checked_limiter = _default_limiter(link, backend)  # type: ignore[arg-type]
    return link, Handle(_name_of(func), checked_policy, link, checked_limiter), payload


async def run_killable(
    func: Callable[[Unpack[Ts]], T],
    /,
    *args: Unpack[Ts],
    backend: Backend = "thread",
    policy: Policy | None = None,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """Run a blocking callable in a thread or a worker process, and really stop it on cancel.

    These two lines are equivalent, except that the second can be stopped:

        result = func(*args)
        result = await run_killable(func, *args)

    Keyword arguments for ``func`` go through ``functools.partial()``.

    Args:
        func: a plain (not async) callable.
        *args: positional arguments for ``func``.
        backend: ``"thread"`` (default) or ``"process"``.
        policy: how hard to try when stopping; defaults to ``Policy()``.
        limiter: an ``anyio.CapacityLimiter``; defaults to 40 threads per event
            loop. A thread given up on at rung 3 keeps its token until it really ends.

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
    link, handle, payload = _setup(func, args, backend, policy, limiter, "run_killable()")
    limiter = handle._limiter
    await link.checkpoint_if_cancelled()
    try:
        limiter.acquire_on_behalf_of_nowait(handle)
    except anyio.WouldBlock:
        await limiter.acquire_on_behalf_of(handle)
    if link.name == "trio":
        # Ctrl-C under trio raises KeyboardInterrupt wherever unprotected code runs; if it
        # landed between starting the target and the shielded wait, nothing would stop
        # the target. Protected, it arrives at the wait, and the ladder runs first.
        return await _trio_protected()(handle, backend, func, args, payload)  # type: ignore[no-any-return]
    return await _start_and_wait(handle, backend, func, args, payload)  # type: ignore[no-any-return]


async def _start_and_wait(
    handle: Handle[Any],
    backend: Backend,
    func: Callable[..., Any],
    args: Any,
    payload: bytes | None,
) -> Any:
    try:
        _start(handle, backend, func, args, payload)
    except BaseException:
        handle._limiter.release_on_behalf_of(handle)
        raise
    return await handle._wait_here()


_protected: Callable[..., Any] | None = None


def _trio_protected() -> Callable[..., Any]:
    global _protected
    if _protected is None:
        import trio

        _protected = trio.lowlevel.enable_ki_protection(_start_and_wait)
    return _protected


def spawn(
    func: Callable[[Unpack[Ts]], T],
    /,
    *args: Unpack[Ts],
    backend: Backend = "thread",
    policy: Policy | None = None,
    limiter: anyio.CapacityLimiter | None = None,
) -> Handle[T]:
    """Start a blocking callable in a thread or a worker process and return its handle.

    The work starts at once (or as soon as the limiter has room). These two lines are
    equivalent:

        result = await run_killable(func, *args)
        result = await spawn(func, *args)

    Args:
        func: a plain (not async) callable.
        *args: positional arguments for ``func``.
        backend: ``"thread"`` (default) or ``"process"``.
        policy: how hard to try when stopping; defaults to ``Policy()``.
        limiter: an ``anyio.CapacityLimiter``; defaults to
            ``default_limiter()`` of the running loop.

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
    link, handle, payload = _setup(func, args, backend, policy, limiter, "spawn()")
    limiter = handle._limiter
    try:
        limiter.acquire_on_behalf_of_nowait(handle)
    except anyio.WouldBlock:
        _start_when_admitted(handle, backend, func, args, payload, limiter, link)
    else:
        try:
            _start(handle, backend, func, args, payload)
        except BaseException:
            limiter.release_on_behalf_of(handle)
            raise
    return handle


class _Admission:
    """The ladder's Work while a spawned target waits for room in its limiter.

    Cancelling it withdraws the request: the target never runs, and the handle ends as
    COOPERATIVE (it stopped at rung 1 without ever starting).
    """

    __slots__ = ("handle", "link", "scope")

    def __init__(self, handle: Handle[Any], link: Link) -> None:
        self.handle = handle
        self.link = link
        self.scope: anyio.CancelScope | None = None

    def request_stop(self) -> None:
        self.link.post(self._cancel_in_loop)

    def _cancel_in_loop(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def interrupt(self) -> bool:
        return False

    def force(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.handle.name} (waiting for its limiter)"


def _start_when_admitted(
    handle: Handle[Any],
    backend: Backend,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    payload: bytes | None,
    limiter: anyio.CapacityLimiter,
    link: Link,
) -> None:
    """The limiter is full: wait for room in a background task, then start."""
    admission = _Admission(handle, link)
    handle._start(admission)

    async def admit() -> None:
        acquired = False
        try:
            with anyio.CancelScope() as scope:
                admission.scope = scope
                if handle._rung:
                    scope.cancel()
                await limiter.acquire_on_behalf_of(handle)
                acquired = True
            if acquired:
                _start(handle, backend, func, args, payload)
                return
            handle._settle(Stage.COOPERATIVE, None, released=False)
        except BaseException as exc:
            # The loop is shutting down, or starting failed: the handle must still end.
            if acquired:
                limiter.release_on_behalf_of(handle)
            if handle._stage is Stage.RUNNING:
                handle._settle(Stage.FINISHED, (False, exc), released=False)
            if not isinstance(exc, Exception):
                raise

    if isinstance(link, AsyncioLink):
        task = link.loop.create_task(admit())
        _background.add(task)
        task.add_done_callback(_background.discard)
    else:
        import trio

        trio.lowlevel.spawn_system_task(admit)


# Strong references to asyncio admission tasks, which the loop only holds weakly.
_background: set[Any] = set()
