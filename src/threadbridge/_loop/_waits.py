"""Waits that the rest of threadbridge needs from whichever loop runs: written with
anyio, which dispatches to the running loop, so that nothing outside the loop layer
touches cancel scopes, events or worker threads of its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from . import Link

T = TypeVar("T")


class Canceller:
    """Cuts short one ``run_cancellable()`` body, from any thread, before or while it
    runs."""

    __slots__ = ("_link", "_requested", "_scope")

    def __init__(self, link: Link) -> None:
        self._link = link
        self._requested = False
        self._scope: anyio.CancelScope | None = None

    def cancel(self) -> None:
        self._link.call(self._cancel_in_loop)

    def _cancel_in_loop(self) -> None:
        self._requested = True
        if self._scope is not None:
            self._scope.cancel()


async def run_cancellable(canceller: Canceller, fn: Callable[[], Awaitable[None]]) -> bool:
    """Await ``fn()`` until it returns (True) or ``canceller`` cuts it short (False; a
    cancellation of the calling task itself propagates as usual)."""
    with anyio.CancelScope() as scope:
        canceller._scope = scope
        if canceller._requested:
            scope.cancel()
        await fn()
        return True
    return False


async def shielded_in_thread(fn: Callable[[], T]) -> T:
    """Run the blocking ``fn`` in a worker thread of the loop's, shielded from
    cancellation: the caller waits for it whatever happens."""
    with anyio.CancelScope(shield=True):
        result = await anyio.to_thread.run_sync(fn)
    return result


async def shielded(fn: Callable[[], Awaitable[T]]) -> T:
    """Await ``fn()`` shielded from cancellation."""
    with anyio.CancelScope(shield=True):
        result = await fn()
    return result


async def new_limiter(total: float) -> anyio.CapacityLimiter:
    """A capacity limiter of the running loop (made in it, as anyio requires)."""
    return anyio.CapacityLimiter(total)


async def called_back(link: Link, register: Callable[[Callable[[], None]], None]) -> None:
    """Wait (cancellably) until the callback handed to ``register`` is called, from any
    thread."""
    event = anyio.Event()

    def set_in_loop() -> None:
        link.post(event.set)

    register(set_in_loop)
    await event.wait()
