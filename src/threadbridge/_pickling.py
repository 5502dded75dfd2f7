"""What travels between the parent and a worker: jobs one way, answers the other.

A job is ``(func, args)``, pickled by ``_jobs``; an answer is ``(how, value,
interrupted)``: how the target ended ("returned", "raised", or "not started"), what it
returned or raised (an exception travels with its traceback and its chain of causes), and
whether rung 2 reached it. Worker processes import this module: cloudpickle and tblib load
only when needed.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ._errors import RemoteError

RETURNED = "returned"
RAISED = "raised"
NOT_STARTED = "not started"


def _dumps(value: object) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # a __reduce__ may raise anything, SystemExit included
        import cloudpickle  # lambdas, closures, classes defined in __main__

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return,unused-ignore]


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return f"<{type(exc).__qualname__} that cannot be printed>"


def _traceback_text(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        return f"{type(exc).__qualname__} (its traceback cannot be printed)\n"


def remote_error(exc: BaseException, note: str | None = None) -> RemoteError:
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return RemoteError(name, note or _describe(exc), _traceback_text(exc))


_CHAIN_DEPTH = 8  # how many causes and contexts travel with an exception
_MAX_FRAMES = 100  # how many traceback frames (the innermost) travel with one


class _Packed:
    """An exception in parts: the exception itself by plain pickle (which keeps what its
    class's own pickling keeps: SystemExit's code, a frozen dataclass), its traceback as
    tblib's plain data, and its cause and context, packed the same way."""

    __slots__ = ("cause", "context", "exc", "suppress", "traceback")

    def __init__(self, exc: BaseException, depth: int) -> None:
        from tblib import Traceback

        self.exc = exc
        tb = exc.__traceback__
        frames = 0
        walk = tb
        while walk is not None:
            frames += 1
            walk = walk.tb_next
        for _ in range(frames - _MAX_FRAMES):  # a RecursionError's thousand frames: the
            tb = tb.tb_next if tb is not None else None  # innermost ones say the most
        self.traceback = Traceback(tb).as_dict() if tb is not None else None
        deeper = depth + 1 < _CHAIN_DEPTH
        cause, context = exc.__cause__, exc.__context__
        self.cause = _pack_exception(cause, depth + 1) if cause is not None and deeper else None
        self.context = (
            _pack_exception(context, depth + 1) if context is not None and deeper else None
        )
        self.suppress = exc.__suppress_context__

    def __reduce__(self) -> tuple[object, ...]:
        return (_unpack, (self.exc, self.traceback, self.cause, self.context, self.suppress))


def _pack_exception(exc: BaseException, depth: int) -> _Packed:
    return _Packed(exc, depth)


def _unpack(
    exc: BaseException,
    traceback: dict[str, Any] | None,
    cause: BaseException | None,
    context: BaseException | None,
    suppress: bool,
) -> BaseException:
    """In the parent: put the parts back together (object's setattr: the exception's class
    may forbid setting attributes, as a frozen dataclass does)."""
    if traceback is not None:
        from tblib import Traceback

        exc = exc.with_traceback(Traceback.from_dict(traceback).as_traceback())
    object.__setattr__(exc, "__cause__", cause)
    object.__setattr__(exc, "__context__", context)
    object.__setattr__(exc, "__suppress_context__", suppress)
    return exc


def dumps_answer(how: str, value: object, interrupted: bool) -> bytes:
    """In the worker: the answer for the parent, made so that the parent can load it."""
    # Pickling runs the value's own code (__reduce__, __getstate__), which may raise
    # anything, SystemExit included: that is an answer too, never the worker's end.
    if how == RETURNED:
        try:
            return _dumps((how, value, interrupted))
        except BaseException as exc:
            error = TypeError(
                f"the target's result ({type(value).__qualname__}) cannot be pickled to "
                f"send it back from the worker process: {_describe(exc)}"
            )
            return _dumps((RAISED, error, interrupted))
    if how == RAISED:
        assert isinstance(value, BaseException)
        # As itself, with its traceback and its chain; else as a RemoteError. The parent
        # must be able to load it: it is loaded back here first.
        try:
            data = _dumps((how, _pack_exception(value, 0), interrupted))
            pickle.loads(data)
            return data
        except BaseException:
            return _dumps((RAISED, remote_error(value), interrupted))
    return _dumps((how, None, interrupted))


def loads_answer(payload: bytes, name: str) -> tuple[str, Any, bool]:
    """In the parent: (how, value, interrupted) from a worker's answer."""
    try:
        how, value, interrupted = pickle.loads(payload)
    except BaseException as exc:  # even SystemExit from a __setstate__: never hang the call
        error = TypeError(f"the worker's answer for {name} cannot be unpickled: {exc!r}")
        return RAISED, error, False
    return how, value, bool(interrupted)
