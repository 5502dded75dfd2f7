"""What travels between the parent and a worker: jobs one way, answers the other.

A job is ``(func, args)`` pickled with cloudpickle (so that lambdas and closures travel);
an answer is ``(how, value, interrupted)``: how the target ended ("returned", "raised",
or "not started"), what it returned or raised, and whether rung 2 reached it. Worker
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


def remote_error(exc: BaseException, note: str | None = None) -> RemoteError:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return RemoteError(name, note or str(exc), text)


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
        try:
            from tblib import pickling_support

            pickling_support.install(value)  # the worker's traceback travels with it
            data = _dumps((how, value, interrupted))
            pickle.loads(data)  # the parent must be able to load it too
            return data
        except Exception:
            return _dumps((RAISED, remote_error(value), interrupted))
    return _dumps((how, None, interrupted))


def loads_answer(payload: bytes, name: str) -> tuple[str, Any, bool]:
    """In the parent: (how, value, interrupted) from a worker's answer."""
    try:
        how, value, interrupted = pickle.loads(payload)
    except Exception as exc:
        error = TypeError(f"the worker's answer for {name} cannot be unpickled: {exc}")
        return RAISED, error, False
    return how, value, bool(interrupted)
