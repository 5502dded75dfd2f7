"""Rung 2 for threads: raising ``TargetCancelled`` inside another thread.

CPython's ``PyThreadState_SetAsyncExc`` schedules an exception in a thread, raised at its
next bytecode boundary. It never lands inside a blocking C call, and it can land inside
a ``finally`` block or between acquiring a lock and entering ``with``: the hazards page
of the documentation says what that means for targets.
"""

from __future__ import annotations

import sys
import threading

from ._errors import TargetCancelled
from ._token import _local

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
    _async_exc_setters()[0](thread_id, Interrupted)  # type: ignore[operator]
    _reset_shared_flag()


def clear_injection(thread_id: int) -> None:
    """Withdraw an injected exception that has not been raised yet."""
    _async_exc_setters()[1](thread_id, None)  # type: ignore[operator]
    _reset_shared_flag()
