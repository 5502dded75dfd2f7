"""The loop layer: everything that depends on which event loop the caller runs on.

Nothing outside this package imports asyncio or trio or asks which loop it is on. The
rest of threadbridge talks to the caller's loop through a ``Link``: post a callback from
any thread, wait for a run to settle (cancellable, then shielded while the ladder runs),
start a background task, watch a file descriptor, run something when the loop ends.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class Waitable(Protocol):
    """What a Link needs of a run to wait for it (read and written in the loop's thread)."""

    settled: bool  # the loop has been told that the run has ended
    waiters: Any  # the loop's wake-up objects, made by the Link; None until someone waits

    def cancel(self) -> None:
        """Start the ladder (from any thread)."""


class Link(Protocol):
    """One running event loop, as threadbridge uses it."""

    #: What a capacity limiter of this loop raises when it has no token to spare.
    would_block: tuple[type[Exception], ...]
    #: Whether ``protect_from_ki()`` protects anything (trio); where it does not
    #: (asyncio), code may run inline instead of in a protected function of its own.
    #: (Not "is the function returned the same one": trio marks the function's code
    #: and returns the function itself.)
    protects_from_ki: bool

    @property
    def key(self) -> object:
        """Identifies the loop (weakly referenceable, so that caches go away with it)."""
        ...

    def post(self, fn: Callable[[], object]) -> bool:
        """Run ``fn`` soon in the loop's thread. From any thread; never raises. Returns
        False (and drops ``fn``) once the loop has ended."""
        ...

    def call(self, fn: Callable[[], object]) -> bool:
        """Run ``fn`` now if this is the loop's thread, else ``post()`` it."""
        ...

    def is_current(self) -> bool:
        """Whether this loop is the one running in the calling thread."""
        ...

    def checkpoint_if_cancelled(self) -> Awaitable[None]:
        """What to await to raise the loop's cancellation if the calling task is being
        cancelled (the loop library's own, handed out: no coroutine of ours around it)."""
        ...

    async def wait_settled(self, run: Waitable) -> None:
        """Wait until ``run`` settles. If the wait is cancelled: call ``run.cancel()``,
        wait (shielded) until it settles, then let the cancellation propagate once."""

    def wake(self, run: Waitable) -> None:
        """In the loop's thread: mark ``run`` settled and wake its waiters."""

    def start_task(self, fn: Callable[[], Awaitable[None]], name: str) -> bool:
        """Start a background task (not bound to the caller's scopes) in the loop's thread.
        False (and nothing started) if the loop is ending and takes no new task."""
        ...

    def watch_readable(self, fd: int, on_readable: Callable[[], bool], name: str) -> bool:
        """Call ``on_readable()`` in the loop whenever ``fd`` is readable, until it returns
        False or ``unwatch(fd)`` is called. In the loop's thread. False if the loop is
        ending (nothing is watched then)."""
        ...

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd``; in the loop's thread, or after the loop has ended."""

    def on_close(self, fn: Callable[[], None], name: str) -> None:
        """Call ``fn`` in the loop's thread when the loop ends."""

    def protect_from_ki(self, fn: F) -> F:
        """``fn``, made safe from KeyboardInterrupt landing in its unprotected code."""
        ...

    @property
    def portal(self) -> Link | None:
        """The loop's own Link, for what outlives the call (a worker pool, a thread
        target's ``from_thread`` calls): a Link made for one call hands out its loop's.
        None: no event loop runs the call."""
        ...


def keep_watching(on_readable: Callable[[], bool], name: str) -> bool:
    """Call a watcher; whether to go on watching. A watcher that raises is a bug of
    threadbridge's: it is reported (and stops watching) rather than raised into the loop,
    where asyncio would call it again at once, for ever, and trio would crash the run."""
    try:
        return on_readable()
    except Exception:
        import traceback

        from .._internal import violation

        violation(f"{name} raised:\n{traceback.format_exc()}")
        return False


class LinkBase:
    """What the Links of both loops share."""

    __slots__ = ()
    thread_id: int  # the loop's thread, where the Link was made

    def post(self, fn: Callable[[], object]) -> bool:
        raise NotImplementedError

    def call(self, fn: Callable[[], object]) -> bool:
        if threading.get_ident() == self.thread_id:
            fn()
            return True
        return self.post(fn)

    @property
    def portal(self) -> Link:
        return self  # type: ignore[return-value]


# The Link classes, imported on first use: a program that runs only asyncio never imports
# trio, and the reverse.
_asyncio_link: Callable[[Any], Link] | None = None
_trio_link: Callable[[Any], Link] | None = None


def _in_trio_task() -> bool:
    """Whether the running task is trio's, as sniffio tells: its two public markers read
    directly (trio sets ``thread_local.name`` while its tasks run, in a guest run too;
    trio-asyncio sets the context variable per task), without the cost of its call,
    which asks asyncio for the current task too (every asyncio call's path once trio is
    imported)."""
    sniffio = sys.modules.get("sniffio")
    if sniffio is None:
        return False  # trio imports it: no trio task has ever run
    try:
        name = sniffio.thread_local.name
        if name is None:
            name = sniffio.current_async_library_cvar.get()
    except AttributeError:  # pragma: no cover - a sniffio without them: ask it
        try:
            name = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            return False
    return name == "trio"  # type: ignore[no-any-return]


def current_link(what: str) -> Link:
    """The Link of the running event loop, or a RuntimeError that says what to do."""
    global _asyncio_link, _trio_link
    asyncio = sys.modules.get("asyncio")
    trio = sys.modules.get("trio")
    if asyncio is not None:
        loop = asyncio._get_running_loop()  # None, not an exception, outside a loop
        # A trio run can be a guest on an asyncio loop (trio.lowlevel.start_guest_run):
        # its tasks then run in the loop's thread, in the loop's callbacks. sniffio tells
        # whose task this is (trio-asyncio relies on it too).
        if loop is not None and (trio is None or not _in_trio_task()):
            if _asyncio_link is None:
                from ._asyncio import AsyncioLink

                _asyncio_link = AsyncioLink
            return _asyncio_link(loop)
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            if _trio_link is None:
                from ._trio import TrioLink

                _trio_link = TrioLink
            return _trio_link(token)
    raise RuntimeError(
        f"{what} must be called from async code running in an asyncio or trio event loop. "
        "From synchronous code, start one first, e.g. asyncio.run(main()), trio.run(main) "
        "or anyio.run(main), and call it inside main()."
    ) from None
