"""The contract every backend implements, and the registry that names them.

A backend turns a checked call into running work: threads, worker processes, and any
later kind. ``run_killable()`` and ``spawn()`` know backends only through this contract,
so a new kind of backend is one module that subclasses ``Backend`` (and, to be named by a
string, one ``register()`` call).
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable
from typing import Any, Literal

from ._ladder import Run, Work
from ._loop import Link

#: The names that ``backend=`` accepts, for type checkers (the registry below is the truth).
BackendName = Literal["thread", "process", "ray"]


class Backend(abc.ABC):
    """Runs targets somewhere and gives the ladder a ``Work`` for each.

    The order of calls for one ``run_killable()``: ``check_platform()``, ``prepare()``
    (both before anything is acquired or started, so that bad input fails at once), then,
    holding a token of the run's limiter, ``start()`` in the event loop's thread.
    """

    #: How the backend is named in messages.
    name: str = "backend"
    #: Whether the class has a check_platform() of its own (set for each subclass): a
    #: call skips the base class's, which does nothing.
    checks_platform = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.checks_platform = cls.check_platform is not Backend.check_platform

    def check_platform(self, what: str) -> None:  # noqa: B027 - most backends run anywhere
        """Raise a clear error (``NotImplementedError``) where this backend cannot work."""

    @abc.abstractmethod
    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> object:
        """Everything about the call that can fail on bad input (pickling, for a
        process); returns the job that ``start()`` gets. ``name`` names the target."""

    #: Whether ``not_ready()`` can ever be true: a backend that never waits to start a
    #: call leaves it False, and its calls never ask (a method call saved on each).
    may_wait_to_start = False

    def not_ready(self, link: Link) -> bool:
        """Whether a call on ``link`` must first ``await ready(link)``: something it needs
        is still starting (a fork server importing the main script). Called for every
        call of a backend whose ``may_wait_to_start`` is true: it must be cheap."""
        return False

    async def ready(self, link: Link) -> None:  # noqa: B027 - most are always ready
        """Wait, cancellably and without blocking the loop, until ``start()`` can start
        a call without waiting."""

    @abc.abstractmethod
    def start(self, run: Run, job: Any) -> Work:
        """Start the job (in the loop's thread, holding a limiter token); return its Work.

        Call ``run.attach(work)`` before the target can start: from then on the backend
        owns the run's ending, even if something interrupts ``start()`` (on asyncio a
        KeyboardInterrupt can land between any two bytecodes; the ladder then stops the
        target). It calls ``run.report()`` exactly once, whatever happens, and
        ``run.release()`` later if it reported ``release=False``. If ``start()`` raises
        before attaching, nothing may have started: the caller gives the token back.
        (A backend that returns without attaching is attached by its caller.)
        """

    @abc.abstractmethod
    def default_limit(self) -> int:
        """How many of its targets may run at once per event loop, unless a limiter is given."""


# name -> "module:attribute" of a zero-argument factory, imported on first use so that
# naming a backend never imports what the others need.
_NAMED: dict[str, str] = {
    "thread": "threadbridge._thread:backend",
    "process": "threadbridge._process_backend:default_backend",
    "ray": "threadbridge.ray:RayBackend",  # the "ray" extra; ImportError names it
}
_resolved: dict[str, Backend] = {}


def register(name: str, factory: str) -> None:
    """Make ``backend=name`` mean the backend that ``factory`` ("module:callable") makes."""
    _NAMED[name] = factory
    _resolved.pop(name, None)


def check(backend: object, what: str) -> None:
    """Raise what ``resolve()`` would for a ``backend=`` that names nothing, without
    making (or importing) the backend."""
    if not (isinstance(backend, Backend) or (isinstance(backend, str) and backend in _NAMED)):
        resolve(backend, what)


def resolve(backend: object, what: str) -> Backend:
    """The backend that the caller's ``backend=`` argument names, or a clear error."""
    if isinstance(backend, str):
        try:
            return _resolved[backend]
        except KeyError:
            pass
        spec = _NAMED.get(backend)
        if spec is not None:
            module, _, attribute = spec.partition(":")
            made = getattr(importlib.import_module(module), attribute)()
            _resolved[backend] = made
            return made  # type: ignore[no-any-return]
    elif isinstance(backend, Backend):
        return backend
    names = ", ".join(f'"{name}"' for name in _NAMED)
    raise ValueError(
        f"{what}: backend must be one of {names}, or a backend object such as a "
        f"threadbridge.ProcessPool; got {backend!r}"
    )
