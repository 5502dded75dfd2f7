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
any lock at that moment: the handler takes none and starts no thread; it posts each
ladder's hurry to its loop (asyncio's call_soon_threadsafe, trio's run_sync_soon: both
made for signal handlers).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

logger = logging.getLogger("threadbridge")


class _Link(Protocol):
    def post(self, fn: Callable[[], object]) -> bool: ...


class Hurried(Protocol):
    name: str
    link: _Link

    def hurry(self) -> None:
        """Skip the rest of the graces: rung 3 now (or rung 2, without rung 3)."""


# The runs whose awaits were cancelled in the main thread's loop and still wait, and
# whether a Ctrl-C has hurried them already. Main thread only.
_waiting: dict[Hurried, bool] = {}
_wrapped: Any = None  # the handler ours wraps, while ours is installed


def waiting(run: Hurried) -> None:
    """The await of ``run`` has been cancelled and waits for the ladder: a Ctrl-C now
    hurries it. Only for a loop in the main thread, where Python runs signal handlers."""
    global _wrapped
    if threading.current_thread() is not threading.main_thread():
        return
    if not _waiting:
        current = signal.getsignal(signal.SIGINT)
        if not callable(current):
            return  # SIGINT ignored, or not handled from Python: nothing to wrap
        if current is not _on_sigint:
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
    for run in fresh:
        _waiting[run] = True
        run.link.post(functools.partial(_hurry, run))
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


def _hurry(run: Hurried) -> None:
    logger.warning(
        "%s: Ctrl-C while it was being stopped: the rest of its grace periods is skipped",
        run.name,
    )
    run.hurry()


def _after_fork() -> None:
    _waiting.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
