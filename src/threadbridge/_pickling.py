"""What travels between the parent and a worker: jobs one way, answers the other.

A job is ``(func, args)``, pickled by ``_jobs``; an answer is an ``Answer``: how the
target ended (returned, raised, or never started), what it returned or raised (an
exception travels with its traceback and its chain of causes), and whether rung 2 was
sent to it while it ran. Worker processes and remote tasks import this module:
cloudpickle and tblib load only when needed.
"""

from __future__ import annotations

import enum
import pickle
import traceback
from typing import Any, NamedTuple

from ._errors import RemoteError


class How(enum.Enum):
    """How a target ended on its host."""

    RETURNED = "returned"
    RAISED = "raised"
    NOT_STARTED = "not started"  # a stop came before it started: it never ran


class Answer(NamedTuple):
    """What a target host sends back for one job."""

    how: How
    value: Any = None  # what it returned, or the exception it raised
    interrupted: bool = False  # rung 2 was sent to it while it ran
    where: tuple[str, str] | None = None  # its stack as rung 2 fired: (line, stack)


# Looked up once: an enum member's attribute and a lookup by value cost a microsecond or
# so each, on every call's path.
RETURNED, RAISED, NOT_STARTED = How.RETURNED, How.RAISED, How.NOT_STARTED
_NAMES = {how: how.value for how in How}  # how an answer names it on the wire
_BY_NAME = {how.value: how for how in How}
_RETURNED, _RAISED = RETURNED.value, RAISED.value


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


def dumps_answer(
    how: How, value: object, interrupted: bool, where: tuple[str, str] | None = None
) -> bytes:
    """On the host: the answer for the driver (an ``Answer`` once loaded there), made so
    that the driver can load it. It travels as a plain tuple (how, by name; value;
    interrupted; and, if rung 2 found the target running, where it was)."""
    tail = (interrupted,) if where is None else (interrupted, where)
    # Pickling runs the value's own code (__reduce__, __getstate__), which may raise
    # anything, SystemExit included: that is an answer too, never the host's end.
    if how is RETURNED:
        try:
            return _dumps((_RETURNED, value, *tail))
        except BaseException as exc:
            error = TypeError(
                f"the target's result ({type(value).__qualname__}) cannot be pickled to "
                f"send it back from the worker process: {_describe(exc)}"
            )
            return _dumps((_RAISED, error, *tail))
    if how is RAISED:
        assert isinstance(value, BaseException)
        # As itself, with its traceback and its chain; else as a RemoteError. The driver
        # must be able to load it: it is loaded back here first.
        try:
            data = _dumps((_RAISED, _pack_exception(value, 0), *tail))
            pickle.loads(data)
            return data
        except BaseException:
            return _dumps((_RAISED, remote_error(value), *tail))
    return _dumps((_NAMES[how], None, *tail))


def loads_answer(payload: bytes, name: str) -> Answer:
    """In the driver: the answer a host sent for the job that runs ``name``."""
    try:
        loaded = pickle.loads(payload)
        if len(loaded) == 3:  # the common case: rung 2 never came
            how, value, interrupted = loaded
            # tuple.__new__: a NamedTuple's own __new__ is Python code, on every call's path.
            return tuple.__new__(Answer, (_BY_NAME[how], value, bool(interrupted), None))
        how, value, interrupted, (line, stack) = loaded
        return Answer(_BY_NAME[how], value, bool(interrupted), (str(line), str(stack)))
    except BaseException as exc:  # even SystemExit from a __setstate__: never hang the call
        error = TypeError(f"the worker's answer for {name} cannot be unpickled: {exc!r}")
        return Answer(How.RAISED, error)
