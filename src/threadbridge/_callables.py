"""What users pass as a target (or an initializer): checked to be a plain callable,
and named for logs and errors."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any


def name_of(func: Callable[..., Any]) -> str:
    if type(func) is types.FunctionType:  # the common case, in one step
        return func.__qualname__
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


# A plain function is async if its code says so (or, from Python 3.12, if it was marked
# with inspect.markcoroutinefunction(), which sets an attribute on it).
ASYNC_CODE = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def check_func(func: object, what: str) -> None:
    kind = type(func)
    if kind is types.FunctionType:
        if not (func.__code__.co_flags & ASYNC_CODE or func.__dict__):  # type: ignore[attr-defined]
            return  # a def, a lambda or a closure, with no attributes: the common case
    elif kind is types.BuiltinFunctionType or kind is type:
        return  # a function written in C, a class: never async
    if inspect.iscoroutine(func):
        func.close()
        raise TypeError(
            f"{what} expected a sync function, but got a coroutine object; pass the "
            "function itself (without calling it), and make it a plain `def`"
        )
    if not callable(func):
        raise TypeError(f"{what} expected a callable as its first argument, got {func!r}")
    target: Any = func
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
        raise TypeError(
            f"{what} expected a sync function, but {name_of(func)!r} is an async function; "
            "await it directly instead of running it in a thread or a process"
        )
