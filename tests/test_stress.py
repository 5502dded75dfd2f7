"""Stress: thousands of calls cancelled at random moments with random policies.

Marked ``stress``: part of the full suite (and of .ci/run); deselect with -m "not stress".
Leaks of targets, threads, processes, zombies and descriptors are checked after each test
by the suite's fixtures and threadbridge's pytest plugin.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import psutil
import pytest

import threadbridge as tb
from threadbridge import _stats

from . import targets

pytestmark = [pytest.mark.anyio, pytest.mark.stress]

MiB = 1 << 20


def random_policy(rng: random.Random) -> tb.Policy:
    return tb.Policy(
        grace=rng.choice([0, 0.001, 0.01, 0.05]),
        interrupt=rng.random() < 0.8,
        interrupt_grace=rng.choice([0, 0.01, 0.05]),
        force=True,
    )


async def hammer(
    calls: int,
    concurrency: int,
    make_call: Callable[[int, random.Random], tuple[Any, float]],
    seed: int,
) -> dict[str, int]:
    """Run ``calls`` calls, ``concurrency`` at a time, each cancelled after a random delay.

    Checks every result against its own call; returns how the calls ended. Measures RSS
    after the first tenth and at the end.
    """
    rng = random.Random(seed)
    counts = {"returned": 0, "raised": 0, "cancelled": 0}
    wrong: list[object] = []
    limiter = anyio.CapacityLimiter(concurrency)
    rss: dict[str, int] = {}
    me = psutil.Process()

    finished = 0

    async def one(i: int) -> None:
        nonlocal finished
        async with limiter:
            try:
                await check_one(i)
            finally:
                finished += 1
                if finished == calls // 10:
                    rss["tenth"] = me.memory_info().rss

    async def check_one(i: int) -> None:
        call, delay = make_call(i, rng)
        with anyio.move_on_after(delay) as scope:
            try:
                result = await call
            except targets.CustomError as exc:
                if str(exc) != str(i):
                    wrong.append((i, exc))
                counts["raised"] += 1
                return
        if scope.cancelled_caught:
            counts["cancelled"] += 1
        elif result != ("ok", i):
            wrong.append((i, result))
        else:
            counts["returned"] += 1

    async with anyio.create_task_group() as tg:
        for i in range(calls):
            tg.start_soon(one, i)
    rss["end"] = me.memory_info().rss
    assert wrong == [], wrong[:5]
    assert sum(counts.values()) == calls
    for outcome in ("returned", "cancelled"):
        assert counts[outcome] > calls // 20, counts  # both really happened
    assert rss["end"] - rss["tenth"] < 20 * MiB, rss
    return counts


async def test_stress_threads() -> None:
    """10,000 thread calls, cancelled at random moments with random policies."""
    behaviours = ["return", "raise", "check", "tb_sleep"]

    def make_call(i: int, rng: random.Random) -> tuple[Any, float]:
        behaviour = rng.choice(behaviours)
        amount = rng.choice([0, 0.0005, 0.002])
        call = tb.run_killable(
            targets.stress_target, i, behaviour, amount, policy=random_policy(rng)
        )
        return call, rng.choice([0, 0.0005, 0.002, 1.0])

    with anyio.fail_after(240):
        await hammer(10_000, 40, make_call, seed=1)
    # Every target here ends on its own within milliseconds of CPU; the ones abandoned at
    # rung 3 may still be finishing (on a loaded machine, for a while): wait for them.
    assert await anyio.to_thread.run_sync(_stats.wait_quiet, 60)
    assert tb.stats().abandoned_threads == 0


async def test_stress_processes() -> None:
    """2,000 process calls, cancelled at random moments: cooperative stops, SIGTERMs
    and kills, with every result still reaching its own caller."""
    behaviours = ["return"] * 6 + ["raise", "check", "tb_sleep", "sleep", "ignore_term"]

    def make_call(i: int, rng: random.Random) -> tuple[Any, float]:
        behaviour = rng.choice(behaviours)
        amount = rng.choice([0, 0.001, 0.01]) if behaviour != "ignore_term" else 0.3
        call = tb.run_killable(
            targets.stress_target,
            i,
            behaviour,
            amount,
            backend="process",
            policy=random_policy(rng),
        )
        return call, rng.choice([0.001, 0.005, 0.02, 2.0])

    t0 = time.monotonic()
    killed_before = tb.stats().stages[tb.Stage.KILLED]  # the count is the process's
    with anyio.fail_after(300):
        counts = await hammer(2_000, 4, make_call, seed=2)
    stats = tb.stats()
    assert stats.busy_workers == 0
    killed = stats.stages[tb.Stage.KILLED] - killed_before
    assert killed > 0, "no kill happened in this test: it proves too little"
    print(f"processes: {counts} in {time.monotonic() - t0:.1f}s")


async def test_load_1000_concurrent_calls_half_cancelled() -> None:
    """1,000 concurrent calls from one loop (40 threads at a time), half cancelled
    while they run or wait for the limiter: all complete, no deadlock."""
    results: dict[str, int] = {"ok": 0, "cancelled": 0}

    async def one(i: int) -> None:
        with anyio.move_on_after(0.05 if i % 2 else 60) as scope:
            assert await tb.run_killable(targets.stress_target, i, "tb_sleep", 0.02) == (
                "ok",
                i,
            )
        results["cancelled" if scope.cancelled_caught else "ok"] += 1

    t0 = time.monotonic()
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i)
    assert results["ok"] >= 500
    assert results["ok"] + results["cancelled"] == 1000
    print(f"1,000 concurrent calls, half cancelled: {time.monotonic() - t0:.2f}s {results}")
