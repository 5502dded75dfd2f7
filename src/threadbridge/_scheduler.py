"""The clock the ladder climbs by: one daemon thread that runs callbacks at deadlines.

Timing lives on a thread of its own, not on the event loop, so that a ladder keeps
climbing after the loop that started it has gone. Every callback must return promptly
(see ``Work`` in ``_ladder``): one slow rung would delay every other handle's ladder.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable

from . import _locks

logger = logging.getLogger("threadbridge")


class Timer:
    """A callback scheduled to run once; ``cancel()`` withdraws it and drops the callback,
    so that nothing it refers to is kept alive by the scheduler."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn

    def cancel(self) -> None:
        self.fn = None


class Scheduler:
    """Runs callbacks at deadlines on one daemon thread; the thread exits when idle."""

    IDLE_EXIT = 5.0  # seconds with nothing scheduled before the thread exits

    def __init__(self) -> None:
        self._reset()
        self._seq = itertools.count()

    def _reset(self) -> None:
        """Fresh state; also in a forked child, where the parent's thread (and the ladders
        it timed) do not exist and its lock may have been held at the fork."""
        self._cond = _locks.Condition()
        self._heap: list[tuple[float, int, Timer]] = []
        self._running = False
        self._compact_at = 64

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` on the scheduler thread after ``delay`` seconds (never, if infinite)."""
        timer = Timer(fn)
        if math.isinf(delay):
            return timer
        when = time.monotonic() + delay
        with self._cond:
            heap = self._heap
            if len(heap) >= self._compact_at:
                # Withdrawn timers (long graces of work that ended early) would otherwise
                # wait for their far-off deadlines; sweep them whenever the heap doubles.
                heap[:] = [entry for entry in heap if entry[2].fn is not None]
                heapq.heapify(heap)
                self._compact_at = max(64, 2 * len(heap))
            heapq.heappush(heap, (when, next(self._seq), timer))
            if not self._running:
                # Counted as running once it has started: a thread that cannot start (no
                # new threads at interpreter exit, on 3.12) must not leave the timers of
                # every later call waiting for a thread that never comes.
                try:
                    threading.Thread(
                        target=self._main, name="threadbridge-ladder", daemon=True
                    ).start()
                except RuntimeError:
                    # The interpreter is exiting (3.12 and later): the timer cannot fire,
                    # and its caller goes on (a pool's reader of a worker's answers must:
                    # the answer of the call the program waits for is coming).
                    logger.debug("no timer can start: the interpreter is exiting", exc_info=True)
                    return timer
                self._running = True
            elif heap[0][2] is timer:
                self._cond.notify()
        return timer

    def _main(self) -> None:
        while True:
            with self._cond:
                while True:
                    heap = self._heap
                    if not heap:
                        if not self._cond.wait(self.IDLE_EXIT) and not self._heap:
                            self._running = False
                            return
                        continue
                    when, _, timer = heap[0]
                    if timer.fn is None:
                        heapq.heappop(heap)
                        continue
                    delay = when - time.monotonic()
                    if delay <= 0:
                        heapq.heappop(heap)
                        fn, timer.fn = timer.fn, None
                        break
                    self._cond.wait(delay)
            try:
                fn()
            except BaseException:  # pragma: no cover - a bug in a rung must not stop the ladder
                logger.exception("error while escalating")
            del fn


SCHEDULER = Scheduler()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=SCHEDULER._reset)
