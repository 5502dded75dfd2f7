"""Nothing of a call stays alive after it: not its function, arguments or result, not
its handle, not the event loop it ran in."""

from __future__ import annotations

import gc
import sys
import time
import weakref
from typing import Any

import anyio
import pytest

import threadbridge as tb

from . import targets


class Big:
    """A large, weakly referenceable payload."""

    def __init__(self) -> None:
        self.data = bytearray(50 * 1024 * 1024)


def keep(value: Any) -> Any:
    return value


def alive(refs: dict[str, weakref.ref[Any]]) -> list[str]:
    gc.collect()
    return sorted(name for name, ref in refs.items() if ref() is not None)


# The thread that hands a call's outcome back to the loop holds its references until that
# hand-back returns: microseconds after the loop wakes, but on a loaded machine the loop
# may run on and end first. What stayed alive is therefore looked at until this bound,
# which is well below how long an idle pool thread lives (10 s): a call kept alive by its
# pool thread until the thread retires, or by a rung 2 scheduled an hour away, still fails.
SETTLE = 5.0


def alive_after_settling(refs: dict[str, weakref.ref[Any]]) -> list[str]:
    deadline = time.monotonic() + SETTLE
    while (left := alive(refs)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize("grace", [1.0, 3600.0])
def test_thread_call_keeps_nothing_alive(loop: str, grace: float) -> None:
    """After a thread call returns (on a pool thread started for it, or a reused one) and
    its loop has ended, the argument, result, handle and loop are all collectable."""
    from threadbridge import _thread

    assert SETTLE < _thread.IDLE_TIMEOUT
    refs: dict[str, weakref.ref[Any]] = {}

    async def main() -> None:
        refs["loop"] = weakref.ref(_loop_object())
        for i in range(2):  # the first call may start a new pool thread; the second reuses it
            big = Big()
            handle = tb.spawn(keep, big, policy=tb.Policy(grace=grace))
            refs[f"argument {i}"] = weakref.ref(big)
            refs[f"handle {i}"] = weakref.ref(handle)
            result = await handle
            refs[f"result {i}"] = weakref.ref(result)
            del big, handle, result
        cancelled = tb.spawn(tb.sleep, 60, policy=tb.Policy(grace=grace))
        refs["cancelled handle"] = weakref.ref(cancelled)
        await cancelled.stop()
        del cancelled

    anyio.run(main, backend=loop)
    assert alive_after_settling(refs) == []


@pytest.mark.skipif(sys.platform == "win32", reason="the process backend is POSIX only")
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_process_call_keeps_nothing_alive(loop: str) -> None:
    """The same for worker processes: the result, the handle and the loop (which owned a
    pool of workers) are collectable once the loop has ended."""
    refs: dict[str, weakref.ref[Any]] = {}

    async def main() -> None:
        refs["loop"] = weakref.ref(_loop_object())
        handle = tb.spawn(targets.add, 2, 3, backend="process")
        refs["handle"] = weakref.ref(handle)
        assert await handle == 5
        del handle

    anyio.run(main, backend=loop)
    assert alive_after_settling(refs) == []


def _loop_object() -> object:
    """The running loop (asyncio) or the run's token (trio)."""
    try:
        import asyncio

        return asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_trio_token()


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize("how", ["run_killable", "spawn"])
def test_a_slow_hand_back_keeps_nothing_of_the_call_alive(
    monkeypatch: pytest.MonkeyPatch, loop: str, how: str
) -> None:
    """The pool thread that hands a call's outcome back may be held up after waking the
    loop (a loaded machine): the awaiter runs on meanwhile, and once it has dropped them
    the argument, the result and the handle are collectable at once."""
    import threading

    from threadbridge._loop import current_link

    refs: dict[str, weakref.ref[Any]] = {}
    seen: list[list[str]] = []

    async def main() -> None:
        link_type = type(current_link("test"))
        real_post = link_type.post

        def slow_post(self: Any, fn: Any) -> bool:
            posted = real_post(self, fn)
            if threading.current_thread().name == "threadbridge-worker":
                del fn
                time.sleep(0.3)  # the loop runs on; this thread still holds its frame
            return posted

        monkeypatch.setattr(link_type, "post", slow_post)
        for i in range(2):
            big = Big()
            refs[f"argument {i}"] = weakref.ref(big)
            if how == "spawn":
                handle = tb.spawn(keep, big)
                refs[f"handle {i}"] = weakref.ref(handle)
                result = await handle
                del handle
            else:
                result = await tb.run_killable(keep, big)
            refs[f"result {i}"] = weakref.ref(result)
            del big, result
            seen.append(alive(refs))  # at once: the pool thread is still held up

    anyio.run(main, backend=loop)
    assert seen == [[], []]
