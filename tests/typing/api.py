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
    await tb.run_killable(add, 1, "x")  # type: ignore[arg-type]
