"""What a target sees of its own cancellation: the token and the helpers around it.

This module is imported inside worker processes too, so it must stay light: no anyio,
no trio, nothing that starts threads.
"""

from __future__ import annotations

import math
import sys
import threading
from types import TracebackType

from ._errors import TargetCancelled

# Guards the lazy creation of a token's Event (see Token.wait). One lock for all tokens is
# fine: it is only taken by wait() and by the ladder's rung 1, never on the hot path.
_EVENT_LOCK = threading.Lock()


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

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = False
        # Created on first wait(): most targets never wait, and a threading.Event costs
        # more than the rest of a call's bookkeeping.
        self._event: threading.Event | None = None

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
        if event is not None:
            event.set()

    def __repr__(self) -> str:
        return f"<threadbridge.Token {'set' if self._flag else 'clear'}>"


# --- rung 2 for threads -------------------------------------------------------------------

CAN_INJECT = sys.implementation.name == "cpython"

# ctypes is loaded on first use: worker processes never inject, and it costs a few
# milliseconds of start-up.
_setters: tuple[object, object] | None = None


def _async_exc_setters() -> tuple[object, object]:
    global _setters
    if _setters is None:
        import ctypes

        setter = ctypes.pythonapi.PyThreadState_SetAsyncExc
        setter.argtypes = [ctypes.c_ulong, ctypes.py_object]
        setter.restype = ctypes.c_int
        # The same C function, declared so that None goes down as NULL ("clear what is
        # pending") instead of as Py_None.
        clearer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
            ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
        )
        _setters = (setter, clearer)
    return _setters


class _Interrupted(TargetCancelled):
    """The TargetCancelled that rung 2 injects into a thread.

    CPython instantiates an injected exception class in the thread where it fires, at the
    latest when a handler receives it; the constructor notes there that the injection is
    spent, so that nothing later mistakes it for one still pending. It must not take a
    lock: it may fire while its own thread holds the state's lock.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("interrupted (rung 2)",)))
        state = _local.state
        if state is not None:
            state.pending = False


# Before 3.13 the "an asynchronous exception is pending" flag is one per interpreter,
# not per thread. It is set whenever PyThreadState_SetAsyncExc is called, and cleared only
# when a thread raises its own pending exception. While it stays set, every thread takes
# the interpreter's slow path at each check; on CPython 3.11 any function call made under
# sys.settrace (coverage, debuggers, hypothesis' explain phase) then spins forever at its
# first instruction. It stays set while an injection waits in a thread blocked in C, and
# for good after an injection is withdrawn. So the injecting thread clears the flag at
# once by raising and catching an exception of its own: the target keeps its pending
# exception, which the interpreter flags again when the target next takes the GIL.
_SHARED_FLAG = sys.version_info < (3, 13)


class _FlagReset(BaseException):
    """Injected into the current thread and caught at once; never seen elsewhere."""


def _reset_shared_flag() -> None:
    if not _SHARED_FLAG:
        return
    setter = _async_exc_setters()[0]
    try:
        setter(threading.get_ident(), _FlagReset)  # type: ignore[operator]
        while True:  # raised at the latest at the first backward jump
            pass
    except _FlagReset:
        pass


def inject(thread_id: int) -> None:
    """Schedule TargetCancelled in another thread, at its next bytecode boundary."""
    _async_exc_setters()[0](thread_id, _Interrupted)  # type: ignore[operator]
    _reset_shared_flag()


def clear_injection(thread_id: int) -> None:
    """Withdraw an injected exception that has not been raised yet."""
    _async_exc_setters()[1](thread_id, None)  # type: ignore[operator]
    _reset_shared_flag()


class TargetState:
    """Per-run state shared by the target's thread and the ladder.

    Everything that decides whether rung 2 may land happens under ``lock``: the ladder
    injects only while ``running`` is true and outside ``uninterruptible()`` blocks; the
    worker clears ``running`` under the same lock once the target has returned, so an
    injection can never be scheduled into the pool's own code after that point. One that
    was scheduled just before and has not fired yet is withdrawn then (``pending``).
    """

    __slots__ = (
        "abandoned",
        "deferred",
        "depth",
        "interrupt_requested",
        "lock",
        "pending",
        "running",
        "skip",
        "started",
        "thread_id",
        "token",
    )

    def __init__(self, token: Token, lock: threading.Lock) -> None:
        self.token = token
        self.lock = lock  # the handle's: never held while another lock is taken
        self.running = False
        self.started = False  # a pool thread has picked it up
        self.skip = False  # rung 3 came before it started: never run it
        self.thread_id = 0
        self.depth = 0  # nesting of uninterruptible() blocks
        self.interrupt_requested = False  # rung 2 reached: at most once
        self.pending = False  # injected into the thread, not known to have been raised
        self.deferred = False  # requested inside uninterruptible(); raised when it exits
        self.abandoned = False  # rung 3 gave up on it: its thread must never be reused

    def request_interrupt(self) -> bool:
        """Rung 2 for a thread target. Returns whether the target was still running."""
        with self.lock:
            if self.interrupt_requested:
                return False
            if not self.started:
                self.interrupt_requested = True  # it will not run at all
                return True
            if not self.running:
                return False
            self.interrupt_requested = True
            if self.depth:
                self.deferred = True
            else:
                self.pending = True
                inject(self.thread_id)
            return True

    def abandon(self) -> bool:
        """Rung 3 for a thread target. Returns whether the target was still running."""
        with self.lock:
            if not self.started:
                self.skip = True  # the pool thread that picks it up reports it
                return False
            if not self.running:
                return False
            self.abandoned = True
            return True

    def begin(self) -> bool:
        """Called in the pool thread before the target: whether to run it at all."""
        with self.lock:
            self.started = True
            if self.interrupt_requested or self.skip:
                return False
            self.running = True
            return True

    def settle(self) -> bool:
        """Called in the target's thread right after the target returned or raised.

        Once this returns, no injected exception can reach the calling thread. Returns
        whether the target had been abandoned meanwhile. An injection that was on its
        way may still fire in here or on the way in (before the lock is taken); the
        caller catches that TargetCancelled and calls again.
        """
        with self.lock:
            self.running = False
            if self.pending:
                self.pending = False
                clear_injection(self.thread_id)
            return self.abandoned


NEVER_SET = Token()


class _Local(threading.local):
    state: TargetState | None = None
    token: Token = NEVER_SET  # what code outside a target sees


_local = _Local()


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
        if state is None:
            return self
        try:
            with state.lock:
                if state.pending:
                    # Rung 2 was injected before the block began and has not fired yet:
                    # deliver it here, before the block, rather than somewhere inside.
                    state.pending = False
                    clear_injection(state.thread_id)
                    raise TargetCancelled("interrupted (rung 2)")
                state.depth += 1
        except TargetCancelled:
            state.pending = False
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        if state is None:
            return
        with state.lock:
            state.depth -= 1
            fire = state.depth == 0 and state.deferred
            if fire:
                state.deferred = False
        if fire:
            raise TargetCancelled("interrupted (rung 2, held off until uninterruptible() ended)")
