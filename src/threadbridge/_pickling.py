"""What travels between the parent and a worker: jobs one way, answers the other.

A job is ``(func, args)`` pickled with cloudpickle (so that lambdas and closures travel);
an answer is ``(how, value, interrupted[, traceback text])``: how the target ended
("returned", "raised", or "not started"), what it returned or raised, whether rung 2
reached it, and the worker's traceback as text when the exception could not carry it. Worker
processes import this module: cloudpickle and tblib load only when needed.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from typing import Any

from ._errors import RemoteError

RETURNED = "returned"
RAISED = "raised"
NOT_STARTED = "not started"


def dumps_job(func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
    """Pickle a job for a worker, or raise a TypeError that names what cannot travel."""
    import cloudpickle

    try:
        return cloudpickle.dumps((func, args), protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return,unused-ignore]
    except Exception as exc:
        error = exc
    for index, arg in enumerate(args, 1):
        try:
            cloudpickle.dumps(arg)
        except Exception as exc:
            raise TypeError(
                f"argument {index} to {name} ({type(arg).__qualname__} {arg!r:.60}) cannot "
                f'be pickled for backend="process": {exc}. Pass a picklable value, or run '
                'it with backend="thread"'
            ) from None
    raise TypeError(
        f'{name} cannot be pickled for backend="process": {error}. Use a function that '
        "can be pickled (cloudpickle handles lambdas and closures, but not what they "
        'capture if that cannot be pickled), or backend="thread"'
    ) from None


def _dumps(value: object) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle  # lambdas, closures, classes defined in __main__

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return,unused-ignore]


def _traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def remote_error(exc: BaseException, note: str | None = None) -> RemoteError:
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return RemoteError(name, note or str(exc), _traceback_text(exc))


def _dumps_without_tblib(value: object) -> bytes:
    """Plain pickle, ignoring the reducers tblib registers (which fail for some exception
    classes, frozen dataclasses among them, where plain pickle works)."""
    import copyreg
    import io

    table = {
        cls: reducer
        for cls, reducer in copyreg.dispatch_table.items()
        if not getattr(reducer, "__module__", "").startswith("tblib")
    }
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = table
    pickler.dump(value)
    return buffer.getvalue()


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of an exception that came back from a worker without its
    traceback object: it shows the worker's traceback as text."""

    def __str__(self) -> str:
        return f"\n\nTraceback in the worker:\n{self.args[0]}"


def dumps_answer(how: str, value: object, interrupted: bool) -> bytes:
    """In the worker: the answer for the parent, made so that the parent can load it."""
    if how == RETURNED:
        try:
            return _dumps((how, value, interrupted))
        except Exception as exc:
            error = TypeError(
                f"the target's result ({type(value).__qualname__}) cannot be pickled to "
                f"send it back from the worker process: {exc}"
            )
            return _dumps((RAISED, error, interrupted))
    if how == RAISED:
        assert isinstance(value, BaseException)
        # As itself with its traceback (tblib); else as itself with the traceback as text;
        # else as a RemoteError. Each form is loaded back here first: the parent must be
        # able to load it too.
        try:
            from tblib import pickling_support

            pickling_support.install(value)
            data = _dumps((how, value, interrupted))
            pickle.loads(data)
            return data
        except Exception:
            pass
        try:
            data = _dumps_without_tblib((how, value, interrupted, _traceback_text(value)))
            pickle.loads(data)
            return data
        except Exception:
            return _dumps((RAISED, remote_error(value), interrupted))
    return _dumps((how, None, interrupted))


def loads_answer(payload: bytes, name: str) -> tuple[str, Any, bool]:
    """In the parent: (how, value, interrupted) from a worker's answer."""
    try:
        how, value, interrupted, *text = pickle.loads(payload)
        if text and isinstance(value, BaseException):
            # object's setattr: the exception's class may forbid setting attributes
            # (a frozen dataclass), which is why it came without its traceback.
            object.__setattr__(value, "__cause__", RemoteTraceback(text[0]))
    except BaseException as exc:  # even SystemExit from a __setstate__: never hang the call
        error = TypeError(f"the worker's answer for {name} cannot be unpickled: {exc!r}")
        return RAISED, error, False
    return how, value, bool(interrupted)
