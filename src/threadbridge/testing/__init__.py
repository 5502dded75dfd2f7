"""Helpers for the test suites of projects that use threadbridge.

* ``leak_check()`` (a context manager) and ``check_leaks()`` fail a test after which
  a target still runs, an abandoned thread is alive, a worker is busy, or a child
  process or zombie is left; the pytest plugin wraps them as the
  ``threadbridge_leak_check`` fixture (or for every test, with the ini option
  ``threadbridge_leak_check = true``).
* ``set_testing()`` and ``fast_graces()`` cap every policy's grace periods, so that
  a suite that exercises cancellation does not wait out real ones.
* ``active_count()`` and ``wait_all_ended()`` tell when every target has ended.

Example:

    from threadbridge.testing import fast_graces, leak_check

    async def test_timeout_stops_the_crunch():
        with leak_check(), fast_graces():
            with anyio.move_on_after(0.1):
                await threadbridge.run_killable(crunch)
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .. import _policy, _stats

__all__ = (
    "LeakError",
    "active_count",
    "check_leaks",
    "fast_graces",
    "leak_check",
    "set_testing",
    "wait_all_ended",
)


class LeakError(AssertionError):
    """Work, a thread or a process outlived the test. The message names each one.

    Example:

        try:
            check_leaks(timeout=1)
        except LeakError as exc:
            print(exc)  # "thread running crunch still running after the test", ...
    """


def active_count() -> int:
    """Targets running now: busy pool threads, abandoned threads, busy workers.

    Returns:
        The number of targets running in this process now.

    Example:

        assert threadbridge.testing.active_count() == 0
    """
    return _stats.active_count()


async def wait_all_ended(timeout: float | None = None) -> None:
    """Wait, without blocking the event loop, until no target runs anywhere.

    Abandoned threads count until they really end: this is how a test waits for one.

    Raises:
        TimeoutError: ``timeout`` seconds passed first.

    Args:
        timeout: seconds to wait at most; ``None`` waits for ever.

    Example:

        handle.cancel()
        await threadbridge.testing.wait_all_ended(timeout=5)
    """
    import anyio

    from .._loop import current_link

    link = current_link("wait_all_ended()")
    with anyio.fail_after(timeout if timeout is not None else math.inf):
        event = anyio.Event()
        if _stats.when_quiet(functools.partial(link.post, event.set)):
            await event.wait()


def set_testing(on: bool, *, grace: float = 0.01, interrupt_grace: float = 0.05) -> None:
    """Cap every policy's grace periods (``on=True``), or lift the caps (``on=False``).

    While on, a policy's ``grace`` is at most ``grace`` and its ``interrupt_grace`` at
    most ``interrupt_grace``; the rest of the policy (interrupt, force) is unchanged.

    Args:
        on: whether to cap.
        grace: the cap on every policy's ``grace``.
        interrupt_grace: the cap on every policy's ``interrupt_grace``.

    Raises:
        ValueError: a negative or NaN cap.

    Example:

        # conftest.py
        def pytest_configure(config):
            threadbridge.testing.set_testing(True)
    """
    if on:
        _policy.Policy(grace=grace, interrupt_grace=interrupt_grace)  # validates them
        _policy.testing_caps = (grace, interrupt_grace)
    else:
        _policy.testing_caps = None


@contextmanager
def fast_graces(grace: float = 0.01, interrupt_grace: float = 0.05) -> Iterator[None]:
    """``set_testing()`` for the duration of a ``with`` block; restores what was.

    Args:
        grace: the cap on every policy's ``grace``.
        interrupt_grace: the cap on every policy's ``interrupt_grace``.

    Example:

        with fast_graces():
            with anyio.move_on_after(0.1):
                await threadbridge.run_killable(swallows_cancel)  # abandoned in ~60 ms
    """
    before = _policy.testing_caps
    set_testing(True, grace=grace, interrupt_grace=interrupt_grace)
    try:
        yield
    finally:
        _policy.testing_caps = before


def _children() -> dict[int, str]:
    """This process's descendants (zombies included): pid -> description."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with threadbridge[test]
        return _children_from_proc()
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            found[proc.pid] = f"{proc.status()} {' '.join(proc.cmdline())[:80]}"
        except psutil.Error:
            found[proc.pid] = "exited"
    return found


def _children_from_proc() -> dict[int, str]:  # pragma: no cover - fallback without psutil
    if not os.path.isdir("/proc"):
        raise RuntimeError("checking for child processes needs psutil: pip install psutil")
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                found[int(name)] = fields[0]
    return found


def check_leaks(timeout: float = 5.0, *, ignore_children: set[int] | None = None) -> None:
    """Raise ``LeakError`` if any target still runs after ``timeout`` seconds, or
    if a child process or zombie is left (other than those in ``ignore_children``).

    Waits first: targets that are ending (a cancelled cooperative target) get
    ``timeout`` seconds to finish. Worker processes of a loop that has ended are gone by
    the time ``asyncio.run``/``trio.run`` returns; the idle workers and fork servers of a
    loop still running are kept for its next call, and are not leaks.

    Args:
        timeout: seconds to wait for targets that are ending.
        ignore_children: process ids of children that existed before the test.

    Raises:
        LeakError: something outlived the test; the message names each leak.

    Example:

        def teardown_method(self):
            threadbridge.testing.check_leaks(timeout=2)
    """
    problems = []
    if not _stats.wait_quiet(timeout):
        problems += _stats.describe_running()
    problems += _stray_children(ignore_children or set(), timeout)
    if problems:
        raise LeakError("left running after the test:\n  " + "\n  ".join(problems))


def _stray_children(ignore: set[int], timeout: float) -> list[str]:
    """This process's children, other than ``ignore`` and those pools keep, that are
    still there after up to ``timeout`` seconds (a worker being reaped goes meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        # The idle workers (and fork servers) of a loop that outlives the test (a session-
        # scoped loop, an async fixture of wider scope) are kept for the next call.
        ignored = ignore | _stats.kept_processes()
        children = {pid: what for pid, what in _children().items() if pid not in ignored}
        if not children or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return [f"child process {pid} ({what})" for pid, what in sorted(children.items())]


@contextmanager
def leak_check(timeout: float = 5.0) -> Iterator[None]:
    """Fail (LeakError) if the block leaves a target running or a child process behind.

    For any test runner. Children that existed before the block are not counted.

    Raises:
        LeakError: something outlived the block; the message names each leak.

    Example:

        with leak_check():
            asyncio.run(main())
    """
    before = set(_children())
    yield
    check_leaks(timeout, ignore_children=before)
