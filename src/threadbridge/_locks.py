"""threadbridge's own locks: ``with lock:`` that an exception landing at the worst
moment cannot leave held.

An exception raised by a signal handler (Ctrl-C's KeyboardInterrupt, a raising SIGALRM
handler) or injected into a thread (rung 2) lands where the interpreter checks for them:
after most calls into C, at loop back-edges and function entries. Up to CPython 3.13 a
``with`` statement enters its block in one step that makes no such check, so ``with
lock:`` is safe. On CPython 3.14 (gh-148874) ``__enter__`` is called through an ordinary
call, which checks *after* it returns and *before* the block's cleanup is armed: an
exception landing there leaves the lock held for good, and the next ``with`` on it
deadlocks. ``lock.acquire()`` followed by ``try:`` has that gap on every version.

``SafeLock`` is a lock whose ``__enter__`` is a Python method that acquires through a
property (an attribute lookup makes no check): the call into a Python ``__enter__`` makes
none either, and a check at its start comes before the lock is taken. ``Lock()`` gives a
SafeLock on 3.14 and later, and ``threading.Lock`` before, at full speed. ``Condition``
(a lock and a condition variable in one) is a SafeLock that enters as a plain lock before
3.14.

A SafeLock is re-entrant (it is built on ``_thread.RLock``, the only lock type that can be
subclassed): code that works where a lock is not is unchanged. Only ``with`` is safe.
``acquire()`` and ``release()`` by hand are used in one kind of place only: a pool
thread's own steps around its target (no Ctrl-C reaches a pool thread, and rung 2 is
injected only while the target runs, by a thread that holds the target's lock), where
they cost half what ``with`` costs on 3.11 to 3.13 (``with`` on a C lock parses
arguments on the way in and out). ``threading.Condition.wait()`` itself still has a gap,
between giving its lock up and arming its own cleanup, where an exception leaves the
``with`` around it releasing a lock it no longer holds (a RuntimeError, not a lock held
for good). The waits here that can run in the main thread are rare and short: a
pool's shutdown, the testing plugin's wait for quiet.
"""

from __future__ import annotations

import _thread
import contextlib
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

T = TypeVar("T")


# typeshed calls RLock final; CPython lets it be subclassed (threading.RLock is a factory).
class SafeLock(_thread.RLock):  # type: ignore[misc]
    """A lock that ``with`` cannot leave held, on every version (see the module)."""

    __slots__ = ()

    # Reading it takes the lock: in C, with no check for pending exceptions between the
    # lock being taken and __enter__ returning into the guarded block.
    _take = property(_thread.RLock.acquire)

    def __enter__(self) -> bool:  # type: ignore[override]  # no blocking=/timeout=
        self._take  # noqa: B018 - the property acquires
        return True


if TYPE_CHECKING or sys.version_info < (3, 14):
    from threading import Lock as Lock
else:
    Lock = SafeLock


class Condition(SafeLock):  # type: ignore[misc]  # (RLock, see above)
    """A SafeLock that is also a condition variable (``wait``, ``wait_for``, ``notify``,
    ``notify_all``, as ``threading.Condition``'s), in one object.

    Not ``threading.Condition`` itself: its ``__enter__`` and ``__exit__`` are Python code
    that calls the lock's, and an exception landing at either's start or after the inner
    call leaves the lock held, on every version. Here ``with`` takes and gives back this
    lock itself. It is also about a sixth of the cost to make (no ``__init__`` runs; the
    waiters' queue is made by the first wait): every ``threadbridge.Future`` has one.
    """

    # No __slots__: the queue of waiters is set on the instance by its first wait. A
    # list, not a deque: a future has one waiter or two, and a deque's first block
    # (over 512 bytes) comes from the C allocator on every call's path.
    _waiting: list[_thread.LockType] | None = None

    if sys.version_info < (3, 14):
        # Before 3.14 ``with`` enters a lock written in C in one step: its own __enter__,
        # without the Python call of SafeLock's (a future's is entered on every call).
        __enter__ = _thread.RLock.__enter__

    if TYPE_CHECKING:  # _thread.RLock's own, in C (typeshed leaves them out)

        def _is_owned(self) -> bool: ...
        def _release_save(self) -> tuple[int, int]: ...
        def _acquire_restore(self, state: tuple[int, int], /) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        """Give the lock up, sleep until notified or ``timeout`` seconds pass, take it
        back; whether it was notified."""
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        waiting = self._waiting
        if waiting is None:
            waiting = self._waiting = []
        waiting.append(waiter)
        saved = self._release_save()
        notified = False
        try:
            if timeout is None:
                notified = waiter.acquire()
            elif timeout > 0:
                notified = waiter.acquire(True, timeout)
            else:
                notified = waiter.acquire(False)
            return notified
        finally:
            self._acquire_restore(saved)
            if not notified:  # timed out (or interrupted): no longer waiting
                with contextlib.suppress(ValueError):
                    waiting.remove(waiter)

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        """Wait until ``predicate()`` is true, at most ``timeout`` seconds; its last value."""
        result = predicate()
        if result or (timeout is not None and timeout <= 0):
            return result
        end = None if timeout is None else time.monotonic() + timeout
        while not result:
            left = None
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    break
            self.wait(left)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        """Wake up to ``n`` of the threads waiting."""
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiting = self._waiting
        while waiting and n > 0:
            waiter = waiting.pop(0)
            try:
                waiter.release()
            except RuntimeError:  # pragma: no cover - each waiter is released once
                continue
            n -= 1

    def notify_all(self) -> None:
        """Wake every thread waiting (every threadbridge call's path: one loop, no
        notify())."""
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiting = self._waiting
        while waiting:
            waiting.pop().release()
