"""The Link for trio runs."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import trio

from . import LinkBase, Waitable, _ctrl_c, keep_watching

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


# Protected wrappers, made once per function (making one costs more than a call's
# bookkeeping).
_protected: dict[Callable[..., Any], Callable[..., Any]] = {}


class TrioLink(LinkBase):
    __slots__ = ("thread_id", "token", "watching")
    # anyio's limiters and trio's own (which users of trio pass) say it differently.
    would_block: tuple[type[Exception], ...] = (anyio.WouldBlock, trio.WouldBlock)
    protects_from_ki = True

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.thread_id = threading.get_ident()
        # The current watch of each descriptor. A watcher task starts a moment after it
        # is made: if its descriptor was unwatched and closed meanwhile, and its number
        # given to another descriptor (a new worker's pipe), it must not wait on that.
        self.watching: dict[int, object] = {}

    @property
    def key(self) -> object:
        return self.token

    def post(self, fn: Callable[[], object]) -> bool:
        try:
            self.token.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False  # the run has ended: nobody is left to tell
        return True

    def is_current(self) -> bool:
        try:
            return trio.lowlevel.current_trio_token() is self.token
        except RuntimeError:
            return False

    def checkpoint_if_cancelled(self) -> Awaitable[None]:
        return trio.lowlevel.checkpoint_if_cancelled()  # noqa: ASYNC105 - awaited by the caller

    def wake(self, run: Waitable) -> None:
        run.settled = True
        if _ctrl_c._waiting:
            _ctrl_c.settled(run)
        waiters, run.waiters = run.waiters, None
        for task in waiters or ():
            trio.lowlevel.reschedule(task)

    async def wait_settled(self, run: Waitable) -> None:
        if run.settled:
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        if run.waiters is None:
            run.waiters = [task]
        else:
            run.waiters.append(task)
        cancelled = False

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            # Called by trio inside the cancel itself (a scope's cancel(), a deadline,
            # Ctrl-C): rung 1 happens there. The wait goes on, shielded in effect, until
            # the run settles and wake() reschedules this task.
            nonlocal cancelled
            cancelled = True
            _ctrl_c.waiting(run)  # type: ignore[arg-type]  # before the target can tell
            run.cancel()
            return trio.lowlevel.Abort.FAILED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if cancelled:
            # The cancellation (or KeyboardInterrupt) that started the ladder is still
            # pending: deliver it now that the work has stopped.
            await trio.lowlevel.checkpoint_if_cancelled()

    def start_task(self, fn: Callable[[], Awaitable[None]], name: str) -> bool:
        try:
            trio.lowlevel.spawn_system_task(fn, name=name)
        except RuntimeError:
            return False  # the run is ending ("Nursery is closed to new arrivals")
        return True

    def watch_readable(self, fd: int, on_readable: Callable[[], bool], name: str) -> bool:
        watch = self.watching[fd] = object()

        async def reader() -> None:
            try:
                while self.watching.get(fd) is watch:
                    await trio.lowlevel.wait_readable(fd)
                    if not keep_watching(on_readable, name):
                        return
            except (trio.ClosedResourceError, OSError):
                return  # unwatched, or the descriptor was closed under us
            finally:
                if self.watching.get(fd) is watch:
                    del self.watching[fd]

        if self.start_task(reader, name):
            return True
        del self.watching[fd]
        return False

    def unwatch(self, fd: int) -> None:
        self.watching.pop(fd, None)
        try:
            trio.lowlevel.notify_closing(fd)
        except (RuntimeError, ValueError, OSError):
            pass  # the run has ended

    def on_close(self, fn: Callable[[], None], name: str) -> None:
        async def guard() -> None:
            try:
                await trio.sleep_forever()
            finally:
                fn()

        trio.lowlevel.spawn_system_task(guard, name=name)

    def protect_from_ki(self, fn: F) -> F:
        # Ctrl-C under trio raises KeyboardInterrupt wherever unprotected code runs; if
        # it landed between starting a target and the shielded wait, nothing would stop
        # the target. Protected, it arrives at the wait, and the ladder runs first.
        try:
            return _protected[fn]  # type: ignore[return-value]
        except KeyError:
            wrapped = _protected[fn] = trio.lowlevel.enable_ki_protection(fn)
            return wrapped
