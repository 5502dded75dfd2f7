"""The thin layer that knows which event loop the caller runs on.

Everything else in threadbridge is loop-agnostic: targets end in other threads and tell
the loop through ``Link.post``, a thread-safe "run this soon in the loop" that never
raises, even after the loop has closed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio

if TYPE_CHECKING:
    import trio


class Waitable(Protocol):
    """What the loop-side of a handle exposes to a Link."""

    _loop_settled: bool
    _loop_event: Any

    def cancel(self) -> None: ...


class Link(Protocol):
    name: str

    @property
    def key(self) -> object:
        """Identifies the running loop; weakly referenceable."""

    async def checkpoint_if_cancelled(self) -> None: ...

    def post(self, fn: Callable[[], object]) -> None: ...

    def is_current(self) -> bool: ...

    def wake(self, waiters: Any) -> None: ...

    async def wait_settled(self, handle: Waitable) -> None: ...


def _anyio_asyncio_checkpoint() -> Callable[[], Awaitable[None]]:
    # anyio.lowlevel.checkpoint_if_cancelled() first asks sniffio which library runs,
    # which costs more than the rest of a call's bookkeeping. The backend class answers
    # the same question directly; fall back to the public function if it moves.
    try:
        from anyio._core._eventloop import get_async_backend

        return get_async_backend("asyncio").checkpoint_if_cancelled
    except Exception:  # pragma: no cover - depends on anyio's internals
        return anyio.lowlevel.checkpoint_if_cancelled


class AsyncioLink:
    __slots__ = ("loop",)
    name = "asyncio"
    _checkpoint: Callable[[], Awaitable[None]] | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    @property
    def key(self) -> object:
        return self.loop

    async def checkpoint_if_cancelled(self) -> None:
        checkpoint = AsyncioLink._checkpoint
        if checkpoint is None:
            checkpoint = AsyncioLink._checkpoint = _anyio_asyncio_checkpoint()
        await checkpoint()

    def post(self, fn: Callable[[], object]) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # the loop has closed: nobody is left to tell

    def is_current(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    @staticmethod
    def wake(waiters: list[asyncio.Future[None]]) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _future(self, handle: Waitable) -> asyncio.Future[None]:
        fut = self.loop.create_future()
        if handle._loop_event is None:
            handle._loop_event = [fut]
        else:
            handle._loop_event.append(fut)
        return fut

    async def wait_settled(self, handle: Waitable) -> None:
        if handle._loop_settled:
            return
        try:
            await self._future(handle)
        except BaseException:
            handle.cancel()
            # anyio re-delivers its scopes' cancellation on every loop iteration; the
            # shield stops that. Plain task.cancel() calls (asyncio.timeout, wait_for,
            # a user) cannot be shielded, so they are absorbed here: the caller gets
            # one CancelledError when the ladder is done, as the contract says.
            with anyio.CancelScope(shield=True):
                while not handle._loop_settled:
                    try:
                        await self._future(handle)
                    except asyncio.CancelledError:
                        continue
            raise


class TrioLink:
    __slots__ = ("token",)
    name = "trio"

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token

    @property
    def key(self) -> object:
        return self.token

    async def checkpoint_if_cancelled(self) -> None:
        await sys.modules["trio"].lowlevel.checkpoint_if_cancelled()

    def post(self, fn: Callable[[], object]) -> None:
        try:
            self.token.run_sync_soon(fn)
        except sys.modules["trio"].RunFinishedError:
            pass  # the run has ended: nobody is left to tell

    def is_current(self) -> bool:
        trio = sys.modules["trio"]
        try:
            return trio.lowlevel.current_trio_token() is self.token
        except RuntimeError:
            return False

    @staticmethod
    def wake(event: trio.Event) -> None:
        event.set()

    async def wait_settled(self, handle: Waitable) -> None:
        import trio

        if handle._loop_settled:
            await trio.lowlevel.checkpoint()
            return
        event = handle._loop_event
        if event is None:
            event = handle._loop_event = trio.Event()
        try:
            await event.wait()
        except BaseException:
            handle.cancel()
            with trio.CancelScope(shield=True):
                await event.wait()
            raise


def current_link(what: str) -> Link:
    """The Link of the running event loop, or a RuntimeError that says what to do."""
    try:
        return AsyncioLink(asyncio.get_running_loop())
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return TrioLink(trio.lowlevel.current_trio_token())
        except RuntimeError:
            pass
    raise RuntimeError(
        f"{what} must be called from async code running in an asyncio or trio event loop. "
        "From synchronous code, start one first, e.g. asyncio.run(main()), trio.run(main) "
        "or anyio.run(main), and call it inside main()."
    ) from None
