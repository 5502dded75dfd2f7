"""Static checks of the public API's types: mypy reads this file, nobody runs it."""

from __future__ import annotations

import functools

from typing_extensions import assert_type

import threadbridge as tb


def add(a: int, b: int) -> int:
    return a + b


async def check() -> None:
    assert_type(await tb.run_killable(add, 1, 2), int)
    assert_type(await tb.run_killable(functools.partial(add, b=2), 1), int)
    handle = tb.spawn(add, 1, 2)
    assert_type(handle, tb.Handle[int])
    assert_type(await handle, int)
    assert_type(await handle.wait(), int)
    assert_type(await handle.stop(), tb.Stage)
    assert_type(handle.stage, tb.Stage)
    assert_type(handle.done(), bool)
    assert_type(tb.cancel_requested(), bool)
    assert_type(tb.current_token().wait(1.0), bool)
    assert_type(tb.stats().abandoned_threads, int)
    assert_type(handle.stopped_at, str | None)
    for target in tb.running():
        assert_type(target, tb.RunningTarget)
        assert_type(target.where(), str)
        assert_type(target.pid, int | None)
    await tb.run_killable(add, 1, "x")  # type: ignore[arg-type]


def check_plain() -> None:
    with tb.Executor(max_workers=2) as ex:
        future = ex.submit(add, 1, 2)
        assert_type(future, tb.Future[int])
        assert_type(future.result(), int)
        assert_type(future.stage, tb.Stage)
        assert_type(future.wait_stopped(1.0), bool)
        assert_type(future.stopped_at, str | None)
        assert_type(list(ex.map(add, [1], [2])), list[int])
    assert_type(tb.call(add, 1, 2, timeout=1.0), int)
    tb.call(add, 1, "x")  # type: ignore[arg-type]

    @tb.killable(timeout=1.0)
    def decorated(a: int) -> str:
        return str(a)

    assert_type(decorated(1), str)
    decorated("x")  # type: ignore[arg-type]

    @tb.killable
    def bare(a: int) -> int:
        return a

    assert_type(bare(1), int)
