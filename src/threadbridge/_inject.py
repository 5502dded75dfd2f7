"""Rung 2 for threads: raising ``TargetCancelled`` inside another thread.

CPython's ``PyThreadState_SetAsyncExc`` schedules an exception in a thread, raised at its
next bytecode boundary. It never lands inside a blocking C call, and it can land inside
a ``finally`` block or between acquiring a lock and entering ``with``: the hazards page
of the documentation says what that means for targets.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _locks
from ._errors import TargetCancelled
from ._token import _local

logger = logging.getLogger("threadbridge")

CAN_INJECT = sys.implementation.name == "cpython"

# ctypes is loaded when a process first starts a pool thread, off the loop and off the
# ladder (see prepare_soon()): worker processes never inject, and importing it costs a few
# milliseconds of start-up, seconds on a loaded machine.
_setters: tuple[object, object] | None = None
_preparing = False


def prepare_soon() -> None:
    """Have what rung 2 needs loaded on the scheduler thread, before any cancel is likely
    to come: on rung 2's path, a slow import would eat into rung 3's grace."""
    global _preparing
    if _setters is None and not _preparing and CAN_INJECT:
        _preparing = True
        from ._scheduler import SCHEDULER

        SCHEDULER.call_later(0.0, _prepare)


def _prepare() -> None:
    try:
        _async_exc_setters()
    except Exception:  # pragma: no cover - rung 2 then says why, when it comes
        logger.exception("could not prepare rung 2 for threads")


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


class Interrupted(TargetCancelled):
    """The TargetCancelled that rung 2 raises inside a target.

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
    catch_dropped()
    _async_exc_setters()[0](thread_id, Interrupted)  # type: ignore[operator]
    _reset_shared_flag()


# Where the injected exception (or, in a worker process, the one raised by the SIGTERM
# handler) fires inside a __del__ method, a gc callback or a weakref callback, CPython
# cannot raise it: it reports it as "unraisable" and drops it, and the
# target runs on. threadbridge's hook (wrapped around whatever hook is installed when a
# target first runs, pytest's included) silences that report for its own exception and has
# the exception delivered again. Not from inside the hook: an exception injected there
# would fire in the hook itself, and taking a lock there could deadlock (the target may
# hold it). A helper thread does it, fed through a SimpleQueue, which is safe to use from
# __del__, and only once the target's thread has left the hook. The same goes for rung 2
# landing inside the hook this one wraps, when that is written in Python.
class _Redeliver:
    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        exc_type = unraisable.exc_type
        if isinstance(exc_type, type) and issubclass(exc_type, Interrupted):
            state = _local.state
            if state is not None:
                _redeliver(state)
            return
        try:
            self.previous(unraisable)
        except Interrupted:
            # Rung 2 landed inside that hook (the target's own unraisable exception, passed
            # to a hook written in Python): CPython would drop it there too.
            state = _local.state
            if state is not None:
                _redeliver(state)


def catch_dropped() -> None:
    """Have rung 2 delivered again wherever CPython drops it (called as each target
    starts, and before each rung 2: the hook may have been replaced meanwhile)."""
    if not isinstance(sys.unraisablehook, _Redeliver):
        sys.unraisablehook = _Redeliver(sys.unraisablehook)


_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
_helper_running = False
_helper_lock = _locks.Lock()


def _reset_after_fork() -> None:
    global _queue, _helper_running, _helper_lock
    _queue = queue.SimpleQueue()
    _helper_running = False
    _helper_lock = _locks.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _redeliver(state: Any) -> None:
    global _helper_running
    _queue.put(state)
    if not _helper_running:
        with _helper_lock:
            if not _helper_running:
                _helper_running = True
                threading.Thread(
                    target=_helper_main, name="threadbridge-redeliver", daemon=True
                ).start()


HELPER_IDLE = 5.0  # seconds the helper thread waits for work before it ends


def _helper_main() -> None:
    global _helper_running
    while True:
        try:
            state = _queue.get(timeout=HELPER_IDLE)
        except queue.Empty:
            with _helper_lock:
                _helper_running = False
            # _redeliver() puts, then looks at the flag without the lock: work put just
            # before the flag went down finds it up and starts no thread. Look again.
            if _queue.empty():
                return
            with _helper_lock:
                if _helper_running:
                    return  # _redeliver() started another helper, which serves it
                _helper_running = True
            continue
        while _in_hook(state.thread_id):
            time.sleep(0)  # let the target's thread finish the hook
        state.deliver_again()


def _in_hook(thread_id: int) -> bool:
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code in _HOOK_CODE:
            return True
        frame = frame.f_back
    return False


def clear_injection(thread_id: int) -> None:
    """Withdraw an injected exception that has not been raised yet."""
    _async_exc_setters()[1](thread_id, None)  # type: ignore[operator]
    _reset_shared_flag()


_HOOK_CODE = (_Redeliver.__call__.__code__, _redeliver.__code__)
