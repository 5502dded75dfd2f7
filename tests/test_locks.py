"""threadbridge's own locks under exceptions that land at any moment.

A raising signal handler (Ctrl-C, a SIGALRM timeout) or rung 2 can land right after a
lock is taken. On CPython 3.14 an exception landing after ``with``'s ``__enter__`` call
leaves a ``threading.Lock`` held (gh-148874); threadbridge's locks must never be left held,
on any version. Neither test is about an event loop.
"""

from __future__ import annotations

import gc
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from threadbridge import _inject, _locks

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class _Landed(Exception):
    pass


OURS = {__file__, _locks.__file__}  # where the signal test's exceptions may land


def _held(lock: Any) -> bool:
    """Whether the lock is held (by this thread, for the 3.14 lock, which is re-entrant)."""
    if hasattr(lock, "_is_owned"):
        return bool(lock._is_owned())
    return bool(lock.locked())


def _guarded(lock: Any, box: list[int]) -> None:
    with lock:
        box[0] += 1


@pytest.fixture(autouse=True)
def _no_garbage_collection() -> Iterator[None]:
    """What other tests left for the collector is collected first, and nothing is
    collected during a test: an exception landing in a __del__ would be lost."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("kind", ["lock", "condition"])
def test_a_raising_signal_handler_never_leaves_a_lock_held(kind: str) -> None:
    """A SIGALRM handler that raises, fired every 10 microseconds around ``with lock:``:
    hundreds of exceptions land in and around the block, and none leaves the lock held."""
    armed = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal armed
        # Only in the code under test: not in a __del__ of a garbage-collected object of
        # another test, where CPython would drop it as "unraisable".
        if armed and frame is not None and frame.f_code.co_filename in OURS:
            armed = False
            raise _Landed

    old = signal.signal(signal.SIGALRM, handler)
    hits = leaks = tries = 0
    box = [0]
    try:
        while hits < 500 and tries < 2_000_000:
            tries += 1
            lock: Any = _locks.Lock() if kind == "lock" else _locks.Condition()
            signal.setitimer(signal.ITIMER_REAL, 0.00001)
            try:
                armed = True
                _guarded(lock, box)
                armed = False
            except _Landed:
                hits += 1
            armed = False
            if _held(lock):
                leaks += 1
                lock.release()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert hits >= 100, f"only {hits} exceptions landed in {tries} tries"
    assert leaks == 0, f"{leaks} of {hits} exceptions left the lock held"


@pytest.mark.skipif(not _inject.CAN_INJECT, reason="rung 2 for threads needs CPython")
def test_rung2_never_leaves_a_lock_held() -> None:
    """Exceptions injected into a thread that takes a lock in a loop (as rung 2 does to a
    target, and as it can land in threadbridge's code around one): a thousand of them, and
    none leaves the lock held."""
    lock: Any = _locks.Lock()
    # Queues, not Events: an exception landing inside Event.set() can leave the Event's
    # own condition locked (threading's code has the gap this module closes).
    ready: queue.SimpleQueue[None] = queue.SimpleQueue()
    caught: queue.SimpleQueue[None] = queue.SimpleQueue()
    stop = False
    leaks = 0
    box = [0]

    def spin() -> None:
        while not stop:
            _guarded(lock, box)

    def loop() -> None:
        nonlocal leaks
        while True:
            try:
                ready.put(None)  # the next exception may come: it lands inside this try
                # In a function of its own: CPython 3.13 loses the handler of a try
                # around a `while flag:` loop that an exception lands in (hazards.md).
                spin()
                return
            except _Landed:
                if _held(lock):
                    leaks += 1
                    lock.release()
                caught.put(None)

    thread = threading.Thread(target=loop, name="takes a lock")
    thread.start()
    setter, _ = _inject._async_exc_setters()
    try:
        for _ in range(1000):
            ready.get(timeout=30)
            assert setter(thread.ident, _Landed) == 1  # type: ignore[operator]
            caught.get(timeout=30)  # raises queue.Empty if it never landed
    finally:
        stop = True
        thread.join(30)
    assert not thread.is_alive()
    assert leaks == 0, f"{leaks} of 1000 injected exceptions left the lock held"


def test_the_condition_keeps_threading_conditions_contract() -> None:
    """``_locks.Condition`` (every threadbridge.Future's) waits and notifies as
    ``threading.Condition``: notify(1) wakes one waiter, notify_all() the rest, a wait
    times out with the lock taken back, and neither works without the lock."""
    cond = _locks.Condition()
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.wait(0)
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.notify()
    with cond:
        assert cond.wait(0) is False
        assert cond.wait(0.01) is False
        assert _held(cond)
        assert cond.wait_for(lambda: 0, 0.01) == 0
        cond.notify_all()  # nobody waits: nothing happens
    ready = [threading.Event() for _ in range(2)]
    woke: queue.Queue[bool] = queue.Queue()

    def waiter(ready: threading.Event) -> None:
        with cond:
            ready.set()  # under the lock, which only its wait gives up
            woke.put(cond.wait(60))

    threads = [threading.Thread(target=waiter, args=(event,)) for event in ready]
    for thread in threads:
        thread.start()
    for event in ready:
        assert event.wait(60)
    with cond:  # taken: both have given it up, in their waits
        cond.notify()
    assert woke.get(timeout=60) is True
    with cond:
        assert woke.empty()  # notify() woke one
        assert cond._waiting is not None
        assert len(cond._waiting) == 1
        cond.notify_all()
    assert woke.get(timeout=60) is True
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
