"""Calling back into the event loop from a thread target.

The counterparts of ``anyio.from_thread`` and ``trio.from_thread`` for code that runs in
a thread started by ``threadbridge.run_killable()`` or ``threadbridge.spawn()``:

    def target(channel):
        for item in produce():
            threadbridge.from_thread.run(channel.send, item)

While the target's handle is being cancelled (rung 1 onwards), they raise
``TargetCancelled`` instead of waiting for the event loop: a target blocked on a call back
into the loop stops with its token.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ._errors import TargetCancelled
from ._token import _local
from ._token import check_cancelled as check_cancelled

if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:
    from typing_extensions import TypeVarTuple, Unpack

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

__all__ = ("check_cancelled", "run", "run_sync")


def run(async_fn: Callable[[Unpack[Ts]], Awaitable[T]], /, *args: Unpack[Ts]) -> T:
    """Run an async function in the event loop that awaits this target, and wait for it.

    These two lines are equivalent, the second written in a thread target:

        result = await async_fn(*args)
        result = threadbridge.from_thread.run(async_fn, *args)

    It runs as a task of its own in the caller's event loop (asyncio or trio).

    Returns:
        What ``async_fn`` returned.

    Raises:
        TargetCancelled: a stop was requested (before or while waiting); the call in the
            event loop is then cancelled.
        RuntimeError: not called from a thread target, or its event loop has ended.
        TypeError: ``async_fn`` is not an async function.
        Exception: whatever ``async_fn`` raised.
    """
    if not callable(async_fn):
        raise TypeError(f"from_thread.run() expected an async function, got {async_fn!r}")

    async def call() -> Any:
        awaitable = async_fn(*args)
        if not inspect.isawaitable(awaitable):
            raise TypeError(
                f"from_thread.run() expected an async function, but {async_fn!r} returned "
                f"{type(awaitable).__name__}; use from_thread.run_sync() for a plain function"
            )
        return await awaitable

    return _in_loop("run", call)  # type: ignore[no-any-return]


def run_sync(fn: Callable[[Unpack[Ts]], T], /, *args: Unpack[Ts]) -> T:
    """Call a plain function in the event loop's thread that awaits this target, and wait.

    These two lines are equivalent, the second written in a thread target:

        result = fn(*args)  # in the event loop
        result = threadbridge.from_thread.run_sync(fn, *args)

    Returns:
        What ``fn`` returned.

    Raises:
        TargetCancelled: a stop was requested (before or while waiting).
        RuntimeError: not called from a thread target, or its event loop has ended.
        TypeError: ``fn`` is an async function.
        Exception: whatever ``fn`` raised.
    """

    async def call() -> Any:
        value = fn(*args)
        if inspect.iscoroutine(value):
            value.close()
            raise TypeError(
                f"from_thread.run_sync() expected a plain function, but {fn!r} returned a "
                "coroutine; use from_thread.run() for an async function"
            )
        return value

    return _in_loop("run_sync", call)  # type: ignore[no-any-return]


class _Call:
    """One call into the loop: its outcome, and the scope that cancels it."""

    __slots__ = ("done", "outcome", "scope", "stop")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: tuple[bool, Any] | None = None
        self.scope: Any = None
        self.stop = False  # cancel it as soon as it starts

    def cancel(self) -> None:
        """In the loop: cancel the call, whether it has started or not."""
        self.stop = True
        if self.scope is not None:
            self.scope.cancel()


def _in_loop(what: str, call_fn: Callable[[], Awaitable[Any]]) -> Any:
    state = _local.state
    # The run's Link hands out its loop's (None: the call has no event loop, as in an
    # Executor's): looked up here, off the path of every call.
    run_link: Any = state.portal if state is not None else None
    link: Any = run_link.portal if run_link is not None else None
    if state is None or link is None:
        raise RuntimeError(
            f"threadbridge.from_thread.{what}() must be called from a thread target started "
            'by threadbridge.run_killable() or spawn() (backend="thread"); an Executor\'s '
            "or call()'s target has no event loop to call; from another thread use "
            f"anyio.from_thread.{what}() with an event loop token"
        )
    token = state.token
    call = _Call()
    if not token._watch(call.done):
        raise TargetCancelled("a stop was requested (rung 1)")

    async def task() -> None:
        import anyio

        cancelled = anyio.get_cancelled_exc_class()
        try:
            with anyio.CancelScope() as scope:
                call.scope = scope
                if call.stop:
                    scope.cancel()
                try:
                    call.outcome = (True, await call_fn())
                except cancelled:
                    raise
                except BaseException as exc:
                    # SystemExit, KeyboardInterrupt and the like too: they are the
                    # caller's, as with anyio's and trio's from_thread (raised here,
                    # they would end the loop, and under trio as an internal error).
                    call.outcome = (False, exc)
            if call.outcome is None:
                call.outcome = (
                    False,
                    TargetCancelled("the call into the event loop was cancelled"),
                )
        except BaseException:
            call.outcome = (False, RuntimeError("the event loop ended during the call"))
            raise
        finally:
            call.done.set()

    def start() -> None:
        if not link.start_task(task, f"threadbridge from_thread.{what}"):
            call.outcome = (False, RuntimeError("the target's event loop is ending"))
            call.done.set()

    try:
        if not link.post(start):
            raise RuntimeError(f"from_thread.{what}(): the target's event loop has ended")
        call.done.wait()
    finally:
        token._unwatch(call.done)
    if call.outcome is None:  # woken by the token: do not wait for the loop any longer
        link.post(call.cancel)
        raise TargetCancelled("a stop was requested while waiting for the event loop (rung 1)")
    ok, value = call.outcome
    if ok:
        return value
    raise value
