"""An asyncio event loop of threadbridge's own, in a daemon thread: where calls made from
plain (not async) code start and are watched, for backends that need a loop (worker
processes, Ray)."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .. import _locks
from . import Link
from ._asyncio import AsyncioLink

T = TypeVar("T")


class LoopThread:
    """One event loop in one thread, for as long as ``close()`` is not called.

    ``link`` is the loop's Link; ``run()`` awaits something in the loop from another
    thread. Closing ends the loop as ``asyncio.run()`` ends one: the loop's leftover
    tasks are cancelled (so that what guards its process pools shuts them down), then
    the thread ends. At exit, a loop not closed is closed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._started = threading.Event()
        self._closing = False
        self._lock = _locks.Lock()
        self._stop: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: Link | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed
        _threads.add(self)

    @property
    def link(self) -> Link:
        assert self._link is not None
        return self._link

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # pragma: no cover - the loop could not start
            self._failed = exc
            self._started.set()

    async def _serve(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self._link = AsyncioLink(loop)
        self._started.set()
        await self._stop

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` in the loop, from another thread; its value or its exception."""
        assert self._loop is not None

        async def call() -> T:
            return await fn()

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(call(), self._loop)
        return future.result()

    def close_soon(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """End the loop once ``before()`` (if given) has been awaited in it. Any thread;
        only the first call counts."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        loop = self._loop
        assert loop is not None

        async def close() -> None:
            try:
                if before is not None:
                    await before()
            finally:
                stop = self._stop
                if stop is not None and not stop.done():
                    stop.set_result(None)

        def start() -> None:
            loop.create_task(close(), name=f"{self.name} closing")

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:
            pass  # the loop has ended already

    def join(self, timeout: float | None = None) -> None:
        """Wait until the loop has ended (``close_soon()`` first)."""
        if not self.is_current():
            self._thread.join(timeout)


_threads: weakref.WeakSet[LoopThread] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    threads = [thread for thread in _threads if thread._thread.is_alive()]
    for thread in threads:
        thread.close_soon()
    for thread in threads:
        thread.join(10)
