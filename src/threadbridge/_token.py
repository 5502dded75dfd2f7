"""What a target sees of its own cancellation: the token and the helpers around it.

The per-run state behind them (``_target.TargetState``) is reached through a
thread-local, set while a target runs in the thread.

This module is imported inside worker processes too, so it must stay light: no anyio,
no trio, nothing that starts threads.
"""

from __future__ import annotations

import math
import os
import threading
from types import TracebackType
from typing import Any, Protocol

from . import _locks
from ._errors import TargetCancelled
from ._public import export


class _TargetState(Protocol):
    """What the running target's state (``_target.TargetState``) offers the functions
    here."""

    @property
    def token(self) -> Token: ...  # the state is its own token (see _target)

    pending: bool  # rung 2 injected into the thread, not known to have been raised
    portal: object  # thread targets: the caller's Link, for from_thread

    def hold(self) -> None: ...

    def release(self) -> None: ...


# Guards the lazy creation of a token's Event (see Token.wait). One lock for all tokens is
# fine: it is only taken by wait() and by the ladder's rung 1, never on the hot path.
_EVENT_LOCK = _locks.Lock()


def _new_lock_after_fork() -> None:
    global _EVENT_LOCK
    _EVENT_LOCK = _locks.Lock()  # another thread of the parent may have held it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_after_fork)


class Token:
    """The stop flag of one running target.

    ``is_set()`` turns true at rung 1 and stays true. ``wait(timeout)`` blocks until it is
    set or the timeout passes, and returns whether it is set.

    Example:

        def poll_device(dev):
            token = threadbridge.current_token()
            while not token.wait(timeout=0.5):  # wakes at once on rung 1
                dev.poll()
    """

    # Fields that most runs never change are defaults of the class, written to the
    # instance only when they change (its __dict__, made then): a token is made for
    # every call, and each field set costs on every call's path.
    __slots__ = ("__dict__", "_flag")

    _watchers: list[threading.Event] | None = None  # also set at rung 1
    # Created on first wait(): most targets never wait, and a threading.Event costs
    # more than the rest of a call's bookkeeping.
    _event: threading.Event | None = None

    def __init__(self) -> None:
        self._flag = False

    def is_set(self) -> bool:
        """Whether a stop has been requested."""
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or ``timeout`` seconds pass.

        Returns:
            True if a stop has been requested, False if the timeout passed first.
        """
        if self._flag:
            return True
        with _EVENT_LOCK:
            event = self._event
            if event is None:
                event = self._event = threading.Event()
                if self.is_set():  # set between the check above and taking the lock
                    event.set()
        return event.wait(timeout)

    def _set(self) -> None:
        with _EVENT_LOCK:
            self._flag = True
            event = self._event
            watchers, self._watchers = self._watchers, None
        if event is not None:
            event.set()
        for watcher in watchers or ():
            watcher.set()

    def _watch(self, event: threading.Event) -> bool:
        """Have rung 1 set ``event`` too; False (and nothing registered) if it is set."""
        with _EVENT_LOCK:
            if self._flag:
                return False
            if self._watchers is None:
                self._watchers = [event]
            else:
                self._watchers.append(event)
            return True

    def _unwatch(self, event: threading.Event) -> None:
        with _EVENT_LOCK:
            if self._watchers is not None and event in self._watchers:
                self._watchers.remove(event)

    def __repr__(self) -> str:
        return f"<threadbridge.Token {'set' if self._flag else 'clear'}>"


NEVER_SET = Token()


class _Local(threading.local):
    #: The running target's token, in its thread, which is also its state
    #: (``_target.TargetState``): one thread-local set as a target starts, one as it
    #: ends. NEVER_SET is what code outside a target sees.
    token: Token = NEVER_SET

    @property
    def state(self) -> _TargetState | None:
        """The running target's state; None outside a target."""
        token = self.token
        return None if token is NEVER_SET else token  # type: ignore[return-value]


_local = _Local()


def thread_slot() -> dict[str, Any]:
    """The calling thread's own namespace of ``_local``, where its ``token`` lives.

    A thread that runs target after target (a pool thread) takes it once and sets each
    target's token there as a dict item: an attribute set on a ``threading.local`` finds
    the thread's namespace first, every time, and two of them (as a target starts and as
    it ends) cost about 3% of an executor call's time. Reading ``_local.token`` finds
    what was stored here.
    """
    return _local.__dict__


def cancel_requested() -> bool:
    """Whether the running target has been asked to stop (rung 1).

    Cheap enough to call in a hot loop. Outside a target it returns False.

    Example:

        for chunk in chunks:
            if threadbridge.cancel_requested():
                return partial_result
            process(chunk)
    """
    return _local.token._flag


def check_cancelled() -> None:
    """Raise ``TargetCancelled`` if the running target has been asked to stop.

    Outside a target it does nothing, so library code may call it unconditionally.

    Raises:
        TargetCancelled: a stop was requested.

    Example:

        for chunk in chunks:
            threadbridge.check_cancelled()  # rung 1 stops the loop here
            process(chunk)
    """
    if _local.token._flag:
        raise TargetCancelled("a stop was requested (rung 1)")


def current_token() -> Token:
    """The ``Token`` of the target running in this thread or worker process.

    Raises:
        RuntimeError: called outside a target run by threadbridge.

    Returns:
        The running target's ``Token``.

    Example:

        token = threadbridge.current_token()
        while not token.is_set():
            step()
    """
    state = _local.state
    if state is None:
        raise RuntimeError(
            "current_token() must be called from inside a target started by "
            "threadbridge.run_killable() or threadbridge.spawn(); outside one there is "
            "nothing that could be cancelled (cancel_requested() returns False there)"
        )
    return state.token


def sleep(seconds: float) -> None:
    """Like ``time.sleep()``, but wakes up and raises as soon as a stop is requested.

    Outside a target it is plain ``time.sleep()``.

    Raises:
        TargetCancelled: a stop was requested before or during the sleep.
        ValueError: ``seconds`` is negative or NaN.
        RuntimeError: called in the thread of a running event loop, which it would block.

    Args:
        seconds: how long to sleep.

    Example:

        while True:
            refresh_cache()
            threadbridge.sleep(30)  # a cancel ends the wait at once
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"sleep() takes a number of seconds, got {seconds!r}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"sleep() length must be zero or more seconds, got {seconds!r}")
    token = _local.token
    if token._flag:
        raise TargetCancelled("a stop was requested (rung 1)")
    if _local.state is None:
        from ._loop._running import in_event_loop

        if in_event_loop():
            raise RuntimeError(
                "threadbridge.sleep() blocks its thread, and this thread runs an event loop; "
                "in async code use `await anyio.sleep()` (or asyncio.sleep, trio.sleep)"
            )
        import time

        time.sleep(seconds)
        return
    if token.wait(None if math.isinf(seconds) else seconds):
        raise TargetCancelled("a stop was requested (rung 1)")


class uninterruptible:
    """Hold off rung 2 while the block runs; it fires when the outermost block exits.

    Use it around code that must not be torn by an exception landing at an arbitrary
    bytecode: updating shared structures, holding a lock taken without ``with``.
    Rung 1 is unaffected (check the token yourself), and so is rung 3: an abandoned
    thread or a killed process cannot be held off.

    Outside a target it does nothing.

    Example:

        with threadbridge.uninterruptible():
            ledger.debit(a)
            ledger.credit(b)
    """

    __slots__ = ("_state",)

    def __enter__(self) -> uninterruptible:
        state = self._state = _local.state
        if state is not None:
            state.hold()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        if state is not None:
            state.release()


export(Token, cancel_requested, check_cancelled, current_token, sleep, uninterruptible)
