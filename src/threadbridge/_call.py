"""call() and @killable: a deadline for a blocking call, in plain (not async) code."""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _locks
from ._backend import Backend, BackendName, check, resolve
from ._callables import check_func
from ._errors import TargetCancelled
from ._policy import DEFAULT_POLICY, Policy, Stage, chosen_policy
from ._public import export
from ._token import NEVER_SET, _local

if TYPE_CHECKING:
    from ._future import Future
    from ._plain import Core

if sys.version_info >= (3, 11):
    from typing import ParamSpec, TypeVarTuple, Unpack
else:
    from typing_extensions import ParamSpec, TypeVarTuple, Unpack

T = TypeVar("T")
P = ParamSpec("P")
Ts = TypeVarTuple("Ts")


class CallTimeout(TimeoutError):
    """``call()`` ran out of time: the target has stopped, and ``stage`` says how.

    A ``TimeoutError``. Its ``__cause__`` is what the target raised as it stopped (the
    ``TargetCancelled`` of rung 2, with the line it was stopped at), if it raised;
    ``stopped_at`` is the target's stack as rung 2 or 3 fired (see
    ``Handle.stopped_at``), or None if rung 1 was enough.
    """

    def __init__(self, message: str, stage: Stage, stopped_at: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.stopped_at = stopped_at


# The engines of call(), one per backend. Threads: no limit on how many run at once, as
# for a direct call (a call() made inside a target must never wait for its caller's
# place). Others: the backend's default limit (one worker per CPU), in an event loop of
# their own.
_cores: dict[Backend, Core] = {}
_cores_lock = _locks.Lock()


def _forget_after_fork() -> None:
    """In a fork's child: the engines are the parent's (their calls, and for worker
    processes their loop and workers); the child's first call() makes its own."""
    global _cores_lock
    _cores_lock = _locks.Lock()  # a thread of the parent may have held it
    _cores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _core_for(backend: Backend, what: str) -> Core:
    try:
        return _cores[backend]
    except KeyError:
        pass
    if hasattr(backend, "__aenter__"):
        raise TypeError(
            f"{what}: a {backend.name} must be entered before use, and call() would keep it "
            "open for ever; make an Executor of it instead, and submit to that: "
            "`with threadbridge.Executor(pool) as ex: ex.submit(...)`"
        )
    # Imported here: a module that only decorates its functions with @killable (and is
    # imported in worker processes) imports no event loop machinery.
    from ._plain import LoopCore, ThreadCore
    from ._thread import ThreadBackend

    with _cores_lock:
        core = _cores.get(backend)
        if core is None:
            if isinstance(backend, ThreadBackend):
                core = ThreadCore(backend, math.inf, DEFAULT_POLICY)
            else:
                limit = backend.default_limit()
                core = LoopCore(
                    backend, limit, DEFAULT_POLICY, f"threadbridge-calls {backend.name}", what
                )
            core.cancel_at_exit = True  # no caller is left to wait for it by then
            _cores[backend] = core
        return core


def _check_timeout(timeout: object, what: str) -> float | None:
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or math.isnan(timeout)
        or timeout < 0
    ):
        raise ValueError(f"{what}: timeout must be seconds >= 0 or None, got {timeout!r}")
    return float(timeout)


def close_engines() -> None:
    """Shut the engines of call() down, waiting for their calls, and forget them: the
    next call() makes new ones. (Their idle workers and loops are kept on purpose between
    calls; a test suite that counts threads and descriptors closes them first.)"""
    with _cores_lock:
        cores = list(_cores.values())
        _cores.clear()
    for core in cores:
        core.shutdown(wait=True, cancel_futures=False)


def call(
    fn: Callable[[Unpack[Ts]], T],
    /,
    *args: Unpack[Ts],
    timeout: float | None = None,
    backend: BackendName | Backend = "thread",
    policy: Policy | None = None,
) -> T:
    """Call ``fn(*args)`` in a thread or a worker process, and stop it at the deadline.

    For plain (not async) code; no event loop is needed:

        rows = threadbridge.call(fetch_report, day, timeout=30)

    Keyword arguments for ``fn`` go through ``functools.partial()``.

    Returns:
        What ``fn`` returned, if it returned within ``timeout`` seconds.

    Raises:
        CallTimeout: a ``TimeoutError``, raised once the target has stopped (its
            ``stage`` says how: it climbed the ladder as a cancelled ``run_killable()``).
        KeyboardInterrupt: Ctrl-C while waiting: the target climbs the ladder first (a
            second Ctrl-C skips the graces), then it propagates.
        TargetCancelled: called inside a target that is being stopped: the inner call
            is stopped first.
        Exception: whatever ``fn`` raised.
        TypeError, ValueError: ``fn`` is async or not callable, ``timeout`` is negative,
            ``backend`` or ``policy`` is not one.
    """
    what = "call()"
    check_func(fn, what)
    limit = _check_timeout(timeout, what)
    chosen = resolve(backend, what)
    core = _core_for(chosen, what)
    future: Future[T] = core.prepare(fn, args, chosen_policy(policy, what))
    try:
        core.begin(future)
        return _wait(future, limit)
    except KeyboardInterrupt:  # wherever it lands from here on, the call is stopped first
        core.interrupted(future)
        raise


def _wait(future: Future[T], timeout: float | None) -> T:
    """The call's value, or CallTimeout once it has stopped."""
    token = _local.token
    if token is NEVER_SET:  # the common case: not inside a target
        done = future._wait_done(timeout)
    else:
        done = _wait_in_target(future, timeout, token)
    if done or not future.cancel():
        return future.result()
    from ._plain import stop

    stop(future)
    run = future._run
    assert run is not None
    error = CallTimeout(
        f"{run.name} did not return within {timeout}s; it was stopped "
        f"({run.stage.value}){run.said_where()}",
        run.stage,
        run.stopped_at,
    )
    raise error from future._dropped


def _wait_in_target(future: Future[Any], timeout: float | None, token: Any) -> bool:
    """Inside a target: the wait ends at the deadline, or when the caller's own target
    is asked to stop; then the inner call is stopped, and TargetCancelled raised."""
    woken = threading.Event()
    if not token._watch(woken):
        woken.set()
    future.add_done_callback(lambda _: woken.set())
    try:
        woken.wait(timeout)
    finally:
        token._unwatch(woken)
    if future.done() or not token.is_set():
        return future.done()
    if future.cancel():
        from ._plain import stop

        stop(future)
        raise TargetCancelled("a stop was requested while waiting for call() (rung 1)")
    return True


@overload
def killable(fn: Callable[P, T], /) -> Callable[P, T]: ...


@overload
def killable(
    *,
    timeout: float | None = None,
    backend: BackendName | Backend = "thread",
    policy: Policy | None = None,
) -> Callable[[Callable[P, T]], Callable[P, T]]: ...


def killable(
    fn: Callable[P, T] | None = None,
    /,
    *,
    timeout: float | None = None,
    backend: BackendName | Backend = "thread",
    policy: Policy | None = None,
) -> Any:
    """Decorate a plain function so that each call goes through ``call()``:

        @threadbridge.killable(timeout=5.0)
        def fetch(url): ...

        fetch(url)  # the value, or CallTimeout once the call has stopped

    ``@killable`` alone gives no deadline (Ctrl-C still stops the call).

    Raises:
        TypeError: the decorated function is async, or not callable; ``policy`` is not
            a ``Policy``.
        ValueError: ``timeout`` is negative, or ``backend`` names no backend.
    """
    what = "@killable"
    limit = _check_timeout(timeout, what)
    check(backend, what)  # resolved at the first call: nothing heavy is imported here
    chosen_policy(policy, what)

    def decorate(func: Callable[P, T]) -> Callable[P, T]:
        check_func(func, what)

        @functools.wraps(func)
        def killable_call(*args: P.args, **kwargs: P.kwargs) -> T:
            target = functools.partial(func, **kwargs) if kwargs else func
            return call(target, *args, timeout=limit, backend=backend, policy=policy)

        return killable_call

    if fn is not None:
        return decorate(fn)
    return decorate


export(call, killable, CallTimeout)
