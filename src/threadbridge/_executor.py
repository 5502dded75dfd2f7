"""Executor: the ladder for code written against ``concurrent.futures``.

A ``concurrent.futures.ThreadPoolExecutor`` (so that asyncio's ``set_default_executor()``
takes it) whose futures can be cancelled while they run: ``cancel()`` starts the ladder,
and the future is CANCELLED at once, as the stdlib says. The engines behind it are in
``_plain``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable
from types import FunctionType as _FunctionType
from typing import Any, TypeVar

from ._backend import Backend, resolve
from ._callables import ASYNC_CODE, check_func
from ._cpus import usable_cpus
from ._future import Future
from ._plain import Core, LoopCore, ThreadCore
from ._policy import Policy, chosen_policy
from ._public import export
from ._thread import ThreadBackend

T = TypeVar("T")


def _default_workers() -> int:
    # What ThreadPoolExecutor chooses: threads for I/O-bound work, a few more than CPUs.
    return min(32, usable_cpus() + 4)


def _check_workers(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Executor(): max_workers must be greater than 0 (or None), got {value!r}")
    return value


def _take(futures: deque[Future[T]], timeout: float | None) -> T:
    """The oldest call's result; if it fails or times out, that call is cancelled too."""
    future = futures.popleft()
    try:
        value = future.result(timeout)
        # The thread that ran the call may hold this future a moment longer (on its way
        # out of settling it); the value must not live on with it. Nobody else sees a
        # map's futures.
        future._result = None
        return value
    except BaseException:
        future.cancel()
        raise
    finally:
        del future


class Executor(concurrent.futures.ThreadPoolExecutor):
    """A ``concurrent.futures`` executor whose running work can be stopped.

    A drop-in for ``ThreadPoolExecutor`` (and a subclass of it, so that
    ``loop.set_default_executor()`` takes it), on every backend ``run_killable()`` has:

        with threadbridge.Executor(max_workers=4) as ex:
            future = ex.submit(crunch, rows)
            ...
            future.cancel()  # running: rung 1 now, then the ladder

    Args:
        backend: ``"thread"`` (default), ``"process"``, ``"ray"``, or a backend object.
        max_workers: how many calls run at once; the rest wait, in order. None: what
            ``ThreadPoolExecutor`` would choose for threads (CPUs + 4, at most 32).
        policy: how hard to try when stopping; defaults to ``Policy()``.

    No event loop is needed. ``shutdown(cancel_futures=True)`` stops running calls too,
    and ``shutdown(wait=True)`` returns once every call has stopped (or been given up on).

    Raises:
        ValueError: an unknown backend, or ``max_workers`` out of range.
        TypeError: ``policy`` is not a ``Policy``.
    """

    def __init__(
        self,
        backend: str | Backend = "thread",
        *,
        max_workers: int | None = None,
        policy: Policy | None = None,
    ) -> None:
        what = "Executor()"
        given: object = backend
        if isinstance(given, int) and not isinstance(given, bool):
            raise TypeError(
                f"Executor({backend!r}): the first argument is the backend; give the number "
                f"of workers by name: Executor(max_workers={backend!r})"
            )
        workers = _check_workers(max_workers)
        policy = chosen_policy(policy, what)
        chosen = resolve(backend, what)
        core: Core
        if isinstance(chosen, ThreadBackend):
            limit = workers or _default_workers()
            core = ThreadCore(chosen, limit, policy)
        else:
            limit = workers or chosen.default_limit()
            core = LoopCore(chosen, limit, policy, f"threadbridge-executor {chosen.name}", what)
        # The stdlib's attributes exist (code that reads _max_workers keeps working); its
        # threads never start: calls run on threadbridge's own.
        super().__init__(max_workers=limit, thread_name_prefix="threadbridge")
        self._core = core
        # An executor dropped without shutdown() lets go of its loop and workers.
        weakref.finalize(self, core.dropped)

    @property
    def policy(self) -> Policy:
        """The escalation policy of this executor's calls."""
        return self._core.policy

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` and return its ``Future``.

        Raises:
            TypeError: ``fn`` is async or not callable.
            RuntimeError: the executor has been shut down.
        """
        if type(fn) is not _FunctionType or fn.__code__.co_flags & ASYNC_CODE or fn.__dict__:
            check_func(fn, "Executor.submit()")  # its first test is the one above
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        return self._core.submit(fn, args, None)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Generator[T, None, None]:
        """``map(fn, *iterables)``, the calls run by this executor; results in order.

        As ``Executor.map()``: every call is submitted now (or, with ``buffersize``,
        at most that many ahead of the results taken). If a call raises, or ``timeout``
        seconds pass before the next result, that error is raised and the calls not
        yet taken are cancelled: running ones climb the ladder. ``chunksize`` is
        accepted and ignored, as by ``ThreadPoolExecutor``.

        Raises:
            TypeError: ``fn`` is async or not callable.
            ValueError: ``buffersize`` is not None or a positive int.
        """
        check_func(fn, "Executor.map()")
        if buffersize is not None and (
            isinstance(buffersize, bool) or not isinstance(buffersize, int) or buffersize < 1
        ):
            raise ValueError(f"Executor.map(): buffersize must be None or > 0, got {buffersize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        submit = self.submit
        futures = deque(
            submit(fn, *args)
            for args in (calls if buffersize is None else itertools.islice(calls, buffersize))
        )

        def results() -> Generator[T, None, None]:
            try:
                while futures:
                    if buffersize is not None:
                        for args in itertools.islice(calls, 1):
                            futures.append(submit(fn, *args))
                    left = None if end is None else end - time.monotonic()
                    yield _take(futures, left)  # no reference to the value stays here
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more calls. ``cancel_futures``: cancel every call, running ones included
        (each climbs its ladder). ``wait``: return once every call has stopped or been
        given up on."""
        self._core.shutdown(wait, cancel_futures)

    def __repr__(self) -> str:
        core = self._core
        state = "shut down" if core.shut else "open"
        return (
            f"<threadbridge.Executor backend={core.backend.name!r} "
            f"max_workers={core.limit} {state}>"
        )


export(Executor)
