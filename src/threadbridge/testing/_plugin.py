"""The pytest plugin of threadbridge.testing (registered through the pytest11 entry point).

Fixtures:

* ``threadbridge_leak_check``: fails the test if, after it, a target still runs, an
  abandoned thread is alive, a worker is busy, or a child process or zombie is left.
* ``threadbridge_fast_graces``: caps every policy's grace periods for the test.

With ``threadbridge_leak_check = true`` in the pytest ini options, every test is
checked, after its fixtures (and so its event loop) have been torn down.

A leak fails the test that left it, once, in a few lines: what was left running, since
when and where it was; a call still running when the test's event loop ended (which
stopped it) counts too. The plugin then stops what still runs with the ladder, on fast
graces, so that the next test starts clean: a thread it had to abandon is not blamed on
the tests after it.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator

import pytest

from .. import _stats, _where
from .._policy import Stage
from . import _children, _stray_children, fast_graces

# How long the check waits for targets whose ladder climbs (a call cancelled without being
# awaited) to end, and, if none climbs, for targets that are about to return.
CLIMBING_WAIT = 5.0
SETTLE_WAIT = 0.5
# How long stopping a leak (on fast graces) may take before the check gives up on it.
STOP_WAIT = 5.0
STOP_INTERRUPT_GRACE = 1.0  # what the plugin gives rung 2 of a leak it stops


LOOP_END_EXPECTED = "threadbridge_loop_end_expected"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{LOOP_END_EXPECTED}: the test ends an event loop while calls still run, on "
        "purpose (the loop's end stops them): the leak check does not count those calls",
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "threadbridge_leak_check",
        "fail every test that leaves threadbridge work, threads or child processes behind",
        type="bool",
        default=False,
    )


# Runs of targets blamed on a test already: a thread abandoned then may run on for good,
# and is not the next test's leak.
_blamed: weakref.WeakSet[object] = weakref.WeakSet()


def _unblamed() -> list[_stats.RunningTarget]:
    return [target for target in _stats.running() if target._run not in _blamed]


def _said(target: _stats.RunningTarget) -> str:
    line = f"{target._said}, for {time.monotonic() - target.started:.1f}s"
    if target.backend == "thread":  # read at once (a worker would be asked, and wait)
        where = _where.line_of(target.where())
        if where is not None:
            line += f", at {where}"
    return line


def _stop(leaked: list[_stats.RunningTarget]) -> str:
    """Stop what the test left running, with the ladder on fast graces; how each ended."""
    runs = [target._run for target in leaked]
    # No time for a cooperative stop (the test is over), but a second for rung 2 to
    # land: a thread abandoned here runs (and may spin) for the rest of the session.
    # It lands within milliseconds on a quiet machine; a loaded one (2 cores, several
    # suites) once missed 0.05 s with a pure-Python loop. Only a thread that rung 2
    # cannot reach (blocked in a C call) waits the whole second.
    with fast_graces(grace=0.01, interrupt_grace=STOP_INTERRUPT_GRACE):
        for run in runs:
            run.cancel()
        _stats.wait_until(
            lambda: all(run.stage is not Stage.RUNNING for run in runs), STOP_WAIT, poll=0.01
        )
    ended = []
    for target, run in zip(leaked, runs, strict=True):
        _blamed.add(run)
        stage = run.stage
        note = (
            " (its thread runs on: not blamed on later tests)" if stage is Stage.ABANDONED else ""
        )
        ended.append(f"{target.name} {stage.name}{note}")
    return "then stopped by the plugin, on fast graces: " + ", ".join(ended)


def _loop_end_expected(item: pytest.Item) -> bool:
    return item.get_closest_marker(LOOP_END_EXPECTED) is not None


def _verdict(before: set[int], mark: int | None) -> str | None:
    """What the test left behind, said in a few lines (None: nothing). ``mark``: count
    the calls that outlived their event loop since then (None: do not)."""
    climbing = any(target.rung for target in _unblamed())
    _stats.wait_until(lambda: not _unblamed(), CLIMBING_WAIT if climbing else SETTLE_WAIT)
    leaked = _unblamed()
    lines = [_said(target) for target in leaked]
    if mark is not None:
        lines += _stats.outlived_since(mark)
    lines += _stray_children(before, CLIMBING_WAIT if lines else SETTLE_WAIT)
    if not lines:
        return None
    text = "threadbridge: left running after the test:\n  " + "\n  ".join(lines)
    if leaked:
        text += "\n" + _stop(leaked)
    return text


@pytest.fixture
def threadbridge_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a target running or a child process behind."""
    before = set(_children())
    # Calls still running when an event loop ended count from here: the test's own loop,
    # if it ends before this fixture's teardown (the ini option sees every test's loop).
    mark = None if _loop_end_expected(request.node) else _stats.outlived_mark()
    yield
    verdict = _verdict(before, mark)
    if verdict is not None:
        pytest.fail(verdict, pytrace=False)


@pytest.fixture
def threadbridge_fast_graces() -> Iterator[None]:
    """Cap every policy at grace=0.01 s and interrupt_grace=0.05 s for this test."""
    with fast_graces():
        yield


_MARK = pytest.StashKey[int | None]()
_BEFORE = pytest.StashKey[set[int]]()


# Plain hooks ordered with tryfirst/trylast, no hook wrappers: they work on every pytest
# from 7.0 on (new-style wrappers need pluggy 1.2; an old-style wrapper that raises is
# reported as a plugin fault by recent pluggy).
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Calls still running when an event loop ends count from before the test's fixtures:
    # an event loop fixture ends in the test's teardown.
    if item.config.getini("threadbridge_leak_check") and not _loop_end_expected(item):
        item.stash[_MARK] = _stats.outlived_mark()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # The baseline of children is taken once the test's fixtures are set up: a helper
    # process that a fixture starts (a server, a manager) is not the test's leak.
    if item.config.getini("threadbridge_leak_check"):
        item.stash[_BEFORE] = set(_children())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    # After pytest's own teardown hook: the test's fixtures (its event loop too) are gone.
    # A test whose setup failed never ran: nothing of it is checked.
    before = item.stash.get(_BEFORE, None)
    if before is None:
        return
    del item.stash[_BEFORE]
    verdict = _verdict(before, item.stash.get(_MARK, None))
    if verdict is not None:
        pytest.fail(verdict, pytrace=False)
