"""A user's test suite, on asyncio and trio, that uses threadbridge.testing.

    pytest -p anyio docs/examples/test_with_threadbridge.py

The ``threadbridge_leak_check`` fixture fails a test after which a target still runs;
``fast_graces()`` shrinks every grace period so that the ladder climbs in milliseconds.
"""

from __future__ import annotations

import threading

import anyio
import pytest

import threadbridge
from threadbridge.testing import fast_graces, wait_all_ended

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("threadbridge_leak_check")]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def deaf_loop(started: threading.Event) -> None:
    """Never checks its token: only rung 2 stops it."""
    started.set()
    while True:
        pass


def swallow_then_wait(started: threading.Event, release: threading.Event) -> None:
    """Catches TargetCancelled and carries on: rung 3 gives up on it."""
    try:
        deaf_loop(started)
    except threadbridge.TargetCancelled:
        release.wait()


# A target cancelled before a thread picked it up never runs (it ends COOPERATIVE), so a
# test about stopping a *running* target first waits until it runs.


async def test_timeout_interrupts_a_deaf_loop() -> None:
    started = threading.Event()
    # Rung 2 ends the loop as soon as its thread runs again. Leaving interrupt_grace
    # uncapped (the policy's 1 s) costs nothing then, and keeps rung 3 away on a busy machine.
    with fast_graces(interrupt_grace=5):
        handle = threadbridge.spawn(deaf_loop, started)
        await anyio.to_thread.run_sync(started.wait)
        with anyio.move_on_after(0.05):
            await handle
    assert handle.stage is threadbridge.Stage.INTERRUPTED


async def test_a_target_that_swallows_the_interrupt_is_abandoned() -> None:
    started, release = threading.Event(), threading.Event()
    with fast_graces():
        handle = threadbridge.spawn(swallow_then_wait, started, release)
        await anyio.to_thread.run_sync(started.wait)
        assert await handle.stop() is threadbridge.Stage.ABANDONED
    release.set()
    await wait_all_ended(timeout=5)  # the abandoned thread really ends


async def test_results_come_back_unchanged() -> None:
    assert await threadbridge.run_killable(sum, [1, 2, 3]) == 6
