"""The target host, driven by a remote backend that lives in this process
(``fake_remote``): what every remote backend gets from the host, checked without worker
processes or a cluster. The ladder above and the host below collaborate through what a
backend carries: jobs, rungs 1 and 2, answers, and rung 3.

The host serves in the main thread (rung 2 is a signal), and each test's event loop runs
in a thread of its own, so these are plain tests run once per loop."""

from __future__ import annotations

import signal
import threading
import time

import anyio
import pytest

import threadbridge as tb

from . import fake_remote
from .fake_remote import RUNG2_SIGNAL, FakeRemote, drive

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "trio"])

# What targets and tests share, by name (a job carries no lock or event in its pickle).
STARTED = threading.Event()
GATE = threading.Event()
SEEN: list[str] = []


@pytest.fixture(autouse=True)
def _fresh() -> None:
    STARTED.clear()
    GATE.clear()
    SEEN.clear()


def _raise_value_error(text: str) -> None:
    raise ValueError(text)


def _wait_for_gate() -> None:
    GATE.wait(60)


def _note(text: str) -> None:
    SEEN.append(text)


def cooperative() -> str:
    STARTED.set()
    tb.current_token().wait()
    tb.check_cancelled()
    return "unreachable"


def sleeper() -> None:
    STARTED.set()
    try:
        time.sleep(60)  # the token is not looked at
    except tb.TargetCancelled as exc:
        SEEN.append(str(exc))
        raise


def takes_the_first_signal() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {RUNG2_SIGNAL})
    STARTED.set()
    try:
        signal.sigwait({RUNG2_SIGNAL})
        SEEN.append("took it")
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {RUNG2_SIGNAL})
    time.sleep(60)


def ignores_everything() -> None:
    STARTED.set()
    try:
        fake_remote.KILLED.wait(60)  # returns once "killed"
    except tb.TargetCancelled:
        SEEN.append("interrupted")


@LOOPS
def test_a_job_answers_its_value_or_its_exception(loop: str) -> None:
    async def main(backend: FakeRemote) -> tuple[object, BaseException]:
        value = await tb.run_killable(lambda a, b: a * b, 6, 7, backend=backend)
        with pytest.raises(ValueError, match="from the host") as info:
            await tb.run_killable(_raise_value_error, "from the host", backend=backend)
        return value, info.value

    value, error = drive(loop, main)
    assert value == 42
    # The exception came back with the host's traceback: its innermost frame is the
    # target's own.
    tb_ = error.__traceback__
    assert tb_ is not None
    while tb_.tb_next is not None:
        tb_ = tb_.tb_next
    assert tb_.tb_frame.f_code.co_name == "_raise_value_error"


@LOOPS
def test_rung1_reaches_the_token(loop: str) -> None:

    async def main(backend: FakeRemote) -> tuple[tb.Stage, int]:
        handle = tb.spawn(cooperative, backend=backend, policy=tb.Policy(grace=30))
        await anyio.to_thread.run_sync(STARTED.wait)
        return await handle.stop(), backend.interrupts_reached

    assert drive(loop, main) == (tb.Stage.COOPERATIVE, 0)


@LOOPS
def test_rung2_is_a_signal_that_ends_a_blocking_call(loop: str) -> None:

    async def main(backend: FakeRemote) -> tuple[tb.Stage, int]:
        policy = tb.Policy(grace=0, interrupt_grace=30)
        handle = tb.spawn(sleeper, backend=backend, policy=policy)
        await anyio.to_thread.run_sync(STARTED.wait)
        return await handle.stop(), backend.interrupts_reached

    assert drive(loop, main) == (tb.Stage.INTERRUPTED, 1)
    assert SEEN == ["interrupted in the fake host (rung 2)"]


@LOOPS
def test_rung2_lost_on_its_way_is_sent_again_until_heard(loop: str) -> None:
    """The first signal is taken before the host's handler can see it (as when it comes
    just before the target's thread enters a blocking call): the host sends it again."""

    async def main(backend: FakeRemote) -> tb.Stage:
        policy = tb.Policy(grace=0, interrupt_grace=30)
        handle = tb.spawn(takes_the_first_signal, backend=backend, policy=policy)
        await anyio.to_thread.run_sync(STARTED.wait)
        return await handle.stop()

    assert drive(loop, main) is tb.Stage.INTERRUPTED
    assert SEEN == ["took it"]


@LOOPS
def test_a_stop_that_comes_before_its_job_keeps_it_from_starting(loop: str) -> None:
    async def main(backend: FakeRemote) -> tuple[tb.Stage, tb.Stage]:
        # The host is busy with the first job: the second waits in the queue, and its
        # stop reaches the host before it does.
        limiter = anyio.CapacityLimiter(2)
        first = tb.spawn(_wait_for_gate, backend=backend, limiter=limiter)
        second = tb.spawn(_note, "ran", backend=backend, limiter=limiter)
        second.cancel()
        GATE.set()
        await first
        return first.stage, await second.stop()

    assert drive(loop, main) == (tb.Stage.FINISHED, tb.Stage.COOPERATIVE)
    assert SEEN == []


@LOOPS
def test_interrupt_false_sends_no_signal_and_rung3_kills(loop: str) -> None:

    async def main(backend: FakeRemote) -> tuple[tb.Stage, int]:
        policy = tb.Policy(grace=0, interrupt=False, interrupt_grace=0)
        handle = tb.spawn(ignores_everything, backend=backend, policy=policy)
        await anyio.to_thread.run_sync(STARTED.wait)
        return await handle.stop(), backend.interrupts_reached

    assert drive(loop, main) == (tb.Stage.KILLED, 0)
    assert SEEN == []


@LOOPS
def test_a_payload_the_host_cannot_load_is_the_calls_error(loop: str) -> None:
    class LoadsBadly:
        def __reduce__(self) -> tuple[object, ...]:
            return (_raise_value_error, ("refused on the host",))

    async def main(backend: FakeRemote) -> BaseException:
        with pytest.raises(tb.RemoteError) as info:
            await tb.run_killable(print, LoadsBadly(), backend=backend)
        return info.value

    error = drive(loop, main)
    assert "the fake host could not unpickle the target or its arguments" in str(error)
    assert "refused on the host" in str(error)


@LOOPS
def test_rung2_that_reaches_nothing_says_so(loop: str) -> None:
    """Work.interrupt() returns whether it reached a running target: a job that ended
    before rung 2 got there is not signalled, and its run is not INTERRUPTED."""

    async def main(backend: FakeRemote) -> tuple[object, bool]:
        handle = tb.spawn(lambda: "done", backend=backend)
        value = await handle
        work = backend.works[0]
        return value, work.interrupt()

    assert drive(loop, main) == ("done", False)
