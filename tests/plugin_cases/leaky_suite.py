"""A user's suite in which three tests leak (run by tests/test_testing.py and, under
pytest-asyncio 0.23, by .ci/run): each leak must fail its own test, once, and no other."""

from __future__ import annotations

import threading

import pytest

import threadbridge as tb

release = threading.Event()


def forgotten() -> None:
    release.wait()


def spin() -> None:
    while True:
        pass


@pytest.mark.anyio
async def test_a_forgets_a_blocked_thread() -> None:
    tb.spawn(forgotten)


@pytest.mark.anyio
async def test_b_forgets_a_spinning_thread() -> None:
    tb.spawn(spin)


@pytest.mark.anyio
async def test_c_forgets_a_process_call() -> None:
    tb.spawn(spin, backend="process")


@pytest.mark.parametrize("n", range(4))
def test_d_clean(n: int) -> None:
    assert n >= 0


def test_z_release() -> None:
    release.set()
