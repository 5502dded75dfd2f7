"""The pytest plugin of threadbridge.testing (registered through the pytest11 entry point).

Fixtures:

* ``threadbridge_leak_check``: fails the test if, after it, a target still runs, an
  abandoned thread is alive, a worker is busy, or a child process or zombie is left.
* ``threadbridge_fast_graces``: caps every policy's grace periods for the test.

With ``threadbridge_leak_check = true`` in the pytest ini options, every test is
checked, after its fixtures (and so its event loop) have been torn down.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import _children, check_leaks, fast_graces


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "threadbridge_leak_check",
        "fail every test that leaves threadbridge work, threads or child processes behind",
        type="bool",
        default=False,
    )


@pytest.fixture
def threadbridge_leak_check() -> Iterator[None]:
    """Fail the test if it leaves a target running or a child process behind."""
    before = set(_children())
    yield
    check_leaks(ignore_children=before)


@pytest.fixture
def threadbridge_fast_graces() -> Iterator[None]:
    """Cap every policy at grace=0.01 s and interrupt_grace=0.05 s for this test."""
    with fast_graces():
        yield


_BEFORE = pytest.StashKey[set[int]]()


# Plain hooks ordered with tryfirst/trylast, no hook wrappers: they work on every pytest
# from 7.0 on (new-style wrappers need pluggy 1.2; an old-style wrapper that raises is
# reported as a plugin fault by recent pluggy).
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # The baseline is taken once the test's fixtures are set up: a helper process that a
    # fixture starts (a server, a manager) is not the test's leak.
    if item.config.getini("threadbridge_leak_check"):
        item.stash[_BEFORE] = set(_children())


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    # After pytest's own teardown hook: the test's fixtures (its event loop too) are gone.
    before = item.stash.get(_BEFORE, None)
    if before is not None:
        check_leaks(ignore_children=before)
