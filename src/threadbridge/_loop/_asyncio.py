"""The Link for asyncio event loops."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from . import LinkBase, Waitable, _ctrl_c, keep_watching

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Strong references to background tasks, which the loop itself holds only weakly.
_background: set[asyncio.Task[None]] = set()


def _anyio_checkpoint() -> Callable[[], Awaitable[None]]:
    # anyio.lowlevel.checkpoint_if_cancelled() first asks sniffio which library runs,
    # which costs more than the rest of a call's bookkeeping. The backend class answers
    # the same question directly; fall back to the public function if it moves.
    try:
        from anyio._core._eventloop import get_async_backend

        return get_async_backend("asyncio").checkpoint_if_cancelled
    except Exception:  # pragma: no cover - depends on anyio's internals
        return anyio.lowlevel.checkpoint_if_cancelled


async def _call(fn: Callable[[], Awaitable[None]]) -> None:
    await fn()


# An asyncio loop hears of a signal only if it interrupts the loop's select(): the C
# handler runs at once, in whichever thread the kernel picked, but the Python handler
# (asyncio's runner's Ctrl-C, or threadbridge's) runs only once the main thread runs
# Python again. A signal that comes just before the loop goes to sleep, or that the
# kernel hands to another thread (a pool thread running a target), leaves an idle loop
# asleep, and a program that awaits a blocking call would ignore that Ctrl-C. asyncio
# gives the C handler a file to wake it (signal.set_wakeup_fd) only for its own
# add_signal_handler(); trio always does. So the first await of threadbridge's in the
# main thread's asyncio loop gives it one, unless the program has set one already, until
# that loop closes.
_woken: weakref.ref[asyncio.AbstractEventLoop] | None = None


def _wake_on_signals(loop: asyncio.AbstractEventLoop) -> None:
    """In the main thread: have a signal wake ``loop`` (see above) through the loop's own
    self-pipe, as its add_signal_handler() does. A loop without one (uvloop) sets its own
    wakeup fd in the main thread already."""
    global _woken
    _woken = weakref.ref(loop)  # tried once per loop, whatever comes of it
    own = getattr(loop, "_csock", None)  # asyncio's selector loops: the loop drains it
    if not isinstance(own, socket.socket):
        return
    wakeup = own.fileno()
    try:
        previous = signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
    except (OSError, ValueError):  # not the main interpreter
        return
    if previous != -1:  # the program's (or the loop's own): it wakes the loop already
        if previous != wakeup:
            signal.set_wakeup_fd(previous)
        return
    done: list[bool] = []

    def restore() -> None:
        # Taken back, once, unless another has been set since (then that one stays).
        if done:
            return
        done.append(True)
        try:
            current = signal.set_wakeup_fd(-1)
            if current != wakeup:
                signal.set_wakeup_fd(current)
        except ValueError:  # the loop closes in another thread than the main one
            pass

    # Taken back as the loop closes, also when it closes without cancelling its tasks
    # (a loop closed by hand): once the pipe is closed, a signal must not write to its
    # number. (Not at its socket's finalization: a free-threaded build may free it later.)
    close_loop = loop.close

    def close_and_restore() -> None:
        restore()
        close_loop()

    loop.close = close_and_restore  # type: ignore[method-assign]


class _Cancelling(threading.local):
    active = False  # this thread is in a waiter's rung 1


_cancelling = _Cancelling()
_MAIN_THREAD = threading.main_thread().ident


class _Waiter(asyncio.Future[None]):
    """What a task awaiting a run waits on. ``Task.cancel()`` (which every asyncio
    cancellation ends in: ``asyncio.timeout``, anyio's scopes, task groups) cancels the
    future its task waits on, synchronously: so rung 1 happens inside the cancel itself.

    Made with the Future's own constructor (written in C), its run set after, and
    settled with the Future's own ``set_result()`` once ``wake()`` has let go of the run:
    no call of Python code of its own on a call's path."""

    _run: Waitable | None = None

    def cancel(self, msg: Any | None = None) -> bool:
        run = self._run
        if run is not None and not self.done():
            if _cancelling.active:
                # Called again while this thread is inside rung 1 of another waiter (a
                # signal handler, such as asyncio's for Ctrl-C, runs between any two
                # bytecodes): that holds the ladder's locks, so this one's rung 1 comes
                # from the loop, at once, instead of deadlocking here.
                self._loop.call_soon(self._rung1, run)
            else:
                self._rung1(run)
        return super().cancel(msg)

    @staticmethod
    def _rung1(run: Waitable) -> None:
        _cancelling.active = True
        try:
            _ctrl_c.waiting(run)  # type: ignore[arg-type]  # before the target can tell
            run.cancel()
        finally:
            _cancelling.active = False


class AsyncioLink(LinkBase):
    __slots__ = ("loop", "thread_id")
    would_block: tuple[type[Exception], ...] = (anyio.WouldBlock,)
    protects_from_ki = False
    _checkpoint: Callable[[], Awaitable[None]] | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread_id = threading.get_ident()

    @property
    def key(self) -> object:
        return self.loop

    def post(self, fn: Callable[[], object]) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:
            return False  # the loop has closed: nobody is left to tell
        return True

    def is_current(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def checkpoint_if_cancelled(self) -> Awaitable[None]:
        checkpoint = AsyncioLink._checkpoint
        if checkpoint is None:
            checkpoint = AsyncioLink._checkpoint = _anyio_checkpoint()
        return checkpoint()

    def wake(self, run: Waitable) -> None:
        run.settled = True
        if _ctrl_c._waiting:
            _ctrl_c.settled(run)
        for fut in run.waiters or ():
            fut._run = None  # no cycle left: the run keeps its waiters until it is gone
            if not fut.done():
                fut.set_result(None)

    def _future(self, run: Waitable) -> asyncio.Future[None]:
        fut = _Waiter(loop=self.loop)
        fut._run = run
        if run.waiters is None:
            run.waiters = [fut]
        else:
            run.waiters.append(fut)
        return fut

    async def wait_settled(self, run: Waitable) -> None:
        if run.settled:
            return
        woken = _woken
        if (woken is None or woken() is not self.loop) and self.thread_id == _MAIN_THREAD:
            _wake_on_signals(self.loop)
        try:
            await self._future(run)
        except BaseException:
            _ctrl_c.waiting(run)  # type: ignore[arg-type]  # before the target can tell
            run.cancel()
            # anyio re-delivers its scopes' cancellation on every loop iteration; the
            # shield stops that. Plain task.cancel() calls (asyncio.timeout, wait_for,
            # a user) cannot be shielded, so they are absorbed here: the caller gets
            # one CancelledError when the ladder is done, as the contract says.
            with anyio.CancelScope(shield=True):
                while not run.settled:
                    try:
                        await self._future(run)
                    except asyncio.CancelledError:
                        continue
            raise

    def start_task(self, fn: Callable[[], Awaitable[None]], name: str) -> bool:
        if self.loop.is_closed():
            return False
        task = self.loop.create_task(_call(fn), name=name)
        _background.add(task)
        task.add_done_callback(_background.discard)
        return True

    def watch_readable(self, fd: int, on_readable: Callable[[], bool], name: str) -> bool:
        def ready() -> None:
            if not keep_watching(on_readable, name):
                self.loop.remove_reader(fd)

        try:
            self.loop.add_reader(fd, ready)
        except RuntimeError:
            return False  # the loop has closed
        return True

    def unwatch(self, fd: int) -> None:
        try:
            self.loop.remove_reader(fd)
        except (RuntimeError, ValueError, OSError):
            pass  # the loop has closed

    def on_close(self, fn: Callable[[], None], name: str) -> None:
        loop = self.loop

        async def guard() -> None:
            try:
                await loop.create_future()  # until the loop cancels its leftover tasks
            finally:
                fn()

        self.start_task(guard, name)

    def protect_from_ki(self, fn: F) -> F:
        # Nothing to mark: asyncio has no KeyboardInterrupt protection. On Python 3.10,
        # or at a second Ctrl-C, it can land between any two bytecodes; backends attach
        # a run's work before handing the target over, so that the ladder reaches it.
        return fn
