"""Ctrl-C while a ladder already climbs: the rest of its graces are skipped.

The first Ctrl-C under asyncio.run(), anyio.run() or trio.run() cancels the main task
(trio raises KeyboardInterrupt into it): an await of threadbridge's climbs its ladder,
shielded, and the interrupt propagates once the work has stopped. A Ctrl-C that comes
while that wait goes on means "now": each cancelled await of the main thread's loop goes
to rung 3 at once (abandon, or SIGKILL), and its wait ends as soon as that is done.

While such a wait goes on, threadbridge's SIGINT handler wraps the loop's own (asyncio's
runner, trio's). It hurries the ladders, then passes the Ctrl-C on to the loop's handler:
to an asyncio runner's through the loop (its first cancels the main task, which takes
the ladder's locks), and not at all to one that has had one already (it would raise
KeyboardInterrupt out of the loop at once, the ladders not yet done).

Python runs a signal handler between any two bytecodes of the main thread, which may hold
any lock at that moment: the handler takes none, and hands the ladders to a thread of its
own through a SimpleQueue (safe in a handler).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from types import FrameType
from typing import Any, Protocol

logger = logging.getLogger("threadbridge")


class Hurried(Protocol):
    name: str

    def hurry(self) -> None:
        """Skip the rest of the graces: rung 3 now (or rung 2, without rung 3)."""


# The runs whose awaits were cancelled in the main thread's loop and still wait, and
# whether a Ctrl-C has hurried them already. Main thread only.
_waiting: dict[Hurried, bool] = {}
_wrapped: Any = None  # the handler ours wraps, while ours is installed
_hurry: queue.SimpleQueue[list[Hurried]] = queue.SimpleQueue()
_helper: threading.Thread | None = None


def waiting(run: Hurried) -> None:
    """The await of ``run`` has been cancelled and waits for the ladder: a Ctrl-C now
    hurries it. Only for a loop in the main thread, where Python runs signal handlers."""
    global _wrapped, _helper
    if threading.current_thread() is not threading.main_thread():
        return
    if not _waiting:
        current = signal.getsignal(signal.SIGINT)
        if not callable(current):
            return  # SIGINT ignored, or not handled from Python: nothing to wrap
        if current is not _on_sigint:
            if _helper is None or not _helper.is_alive():
                _helper = threading.Thread(
                    target=_hurry_runs, name="threadbridge-ctrl-c", daemon=True
                )
                _helper.start()
            _wrapped = current
            signal.signal(signal.SIGINT, _on_sigint)
    _waiting.setdefault(run, False)


def settled(run: object) -> None:
    """``run`` has settled (in its loop's thread): it waits no more."""
    global _wrapped
    if _waiting.pop(run, None) is None or _waiting:  # type: ignore[call-overload]
        return
    if signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, _wrapped)
    _wrapped = None


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    fresh = [run for run, hurried in list(_waiting.items()) if not hurried]
    if fresh:
        for run in fresh:
            _waiting[run] = True
        _hurry.put(fresh)
    handler = _wrapped
    if not callable(handler):
        return
    runner = _runner_of(handler)
    if runner is None:
        # trio's (which keeps its KeyboardInterrupt for the main task until the wait is
        # over), or another: the program hears of every Ctrl-C, as ever.
        handler(signum, frame)
    elif not runner._interrupt_count:
        # An asyncio runner's first Ctrl-C (one that came while a deadline's ladder
        # climbed): it cancels the main task, which must not run inside this handler
        # (the main thread may be inside the ladder's locks): from the loop, at once.
        runner._loop.call_soon_threadsafe(handler, signum, None)
    elif not fresh:
        handler(signum, frame)  # nothing left to hurry: it raises KeyboardInterrupt
    # else: the runner has had its Ctrl-C (it cancelled the main task, and raises
    # KeyboardInterrupt when that ends); a second one would raise out of the loop at
    # once, with the ladder not yet done. This one hurried the ladder instead.


def _runner_of(handler: Any) -> Any:
    """The asyncio runner (the standard library's, or anyio's copy for Python 3.10)
    whose SIGINT handler ``handler`` is, or None."""
    runner = getattr(getattr(handler, "func", None), "__self__", None)
    count = getattr(runner, "_interrupt_count", None)
    loop = getattr(runner, "_loop", None)
    return runner if isinstance(count, int) and loop is not None else None


def _hurry_runs() -> None:
    while True:
        runs = _hurry.get()
        for run in runs:
            logger.warning(
                "%s: Ctrl-C while it was being stopped: the rest of its grace periods is skipped",
                run.name,
            )
            try:
                run.hurry()
            except Exception:  # pragma: no cover - a bug must not stop the next Ctrl-C
                logger.exception("could not hurry %s", run.name)
        del runs


def _after_fork() -> None:
    global _helper, _wrapped
    _waiting.clear()
    _helper = None  # the parent's thread does not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
