"""Process backend benchmark: threadbridge against trio-parallel, anyio and pebble.

Run by hand (needs the "bench" extra: trio-parallel and pebble):

    python benchmarks/processes.py            # full run, ~1-2 minutes
    python benchmarks/processes.py --quick

Measures, for each library that can do it:

* warm no-op call latency (median of many sequential calls on a warm pool);
* the cold first call (a fresh pool: process start included);
* the first call after a worker was killed by a cancellation;
* cancel -> await returns: straight to the kill (rung 3), and for threadbridge also rung 2
  (SIGTERM interrupting a sleeping target), with the worker reaped when the await returns.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import anyio.to_process

sys.path.insert(0, str(Path(__file__).parent))
import _proc_targets as targets
from _table import print_table, save

import threadbridge as tb

KILL_NOW = tb.Policy(grace=0, interrupt=False, interrupt_grace=0)
SIGTERM_NOW = tb.Policy(grace=0, interrupt_grace=5)

Row = tuple[str, str, str, str]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def warm_latency(call: Callable[[], Awaitable[Any]], n: int) -> float:
    for _ in range(20):
        await call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await call()
    return time.perf_counter() - t0


async def cancel_time(start: Callable[[], Coroutine[Any, Any, Any]], settle: float = 0.3) -> float:
    """From cancelling a call that is well under way to the await returning."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        await anyio.sleep(settle)
        t0 = time.perf_counter()
        tg.cancel_scope.cancel()
    return time.perf_counter() - t0


# --- threadbridge -------------------------------------------------------------------------


async def tb_suite(n: int) -> dict[str, float]:
    def call() -> Awaitable[None]:
        return tb.run_killable(targets.noop, backend="process")

    out = {"cold first call": await timed(call)}
    await anyio.sleep(0.5)  # let the standby worker finish starting
    out["warm no-op"] = await warm_latency(call, n)
    out["cancel, kill (rung 3)"] = await cancel_time(
        lambda: tb.run_killable(targets.sleep_long, backend="process", policy=KILL_NOW)
    )
    out["first call after a kill"] = await timed(call)
    await anyio.sleep(0.5)
    out["cancel, SIGTERM (rung 2)"] = await cancel_time(
        lambda: tb.run_killable(targets.sleep_long, backend="process", policy=SIGTERM_NOW)
    )
    return out


# --- anyio.to_process ---------------------------------------------------------------------


async def anyio_suite(n: int) -> dict[str, float]:
    def call() -> Awaitable[None]:
        return anyio.to_process.run_sync(targets.noop, cancellable=True)

    out = {"cold first call": await timed(call)}
    out["warm no-op"] = await warm_latency(call, n)
    out["cancel, kill (rung 3)"] = await cancel_time(
        lambda: anyio.to_process.run_sync(targets.sleep_long, cancellable=True)
    )
    out["first call after a kill"] = await timed(call)
    return out


# --- trio-parallel ------------------------------------------------------------------------


async def trio_parallel_suite(n: int) -> dict[str, float]:
    import trio_parallel

    async with trio_parallel.open_worker_context() as ctx:

        def call() -> Awaitable[None]:
            return ctx.run_sync(targets.noop, kill_on_cancel=True)

        out = {"cold first call": await timed(call)}
        out["warm no-op"] = await warm_latency(call, n)
        out["cancel, kill (rung 3)"] = await cancel_time(
            lambda: ctx.run_sync(targets.sleep_long, kill_on_cancel=True)
        )
        out["first call after a kill"] = await timed(call)
    return out


# --- pebble ---------------------------------------------------------------------------------


async def pebble_suite(n: int) -> dict[str, float]:
    import pebble

    pool = pebble.ProcessPool(max_workers=2)
    try:

        def call() -> Awaitable[None]:
            return asyncio.wrap_future(pool.schedule(targets.noop))

        out = {"cold first call": await timed(call)}
        out["warm no-op"] = await warm_latency(call, n)

        async def cancelled_sleep() -> None:
            future = pool.schedule(targets.sleep_long)
            try:
                await asyncio.shield(asyncio.wrap_future(future))
            except BaseException:
                future.cancel()  # pebble terminates the worker
                while future.running():  # wait until pebble has dealt with it
                    await asyncio.sleep(0.001)
                raise

        out["cancel, kill (rung 3)"] = await cancel_time(cancelled_sleep)
        out["first call after a kill"] = await timed(call)
    finally:
        pool.stop()
        pool.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", metavar="DIR", help="also write processes.json and processes.png")
    args = parser.parse_args()
    n = 200 if args.quick else 1000
    rows: list[Row] = []

    def add(loop: str, library: str, results: dict[str, float]) -> None:
        for measure, value in results.items():
            rows.append((loop, library, measure, ms(value)))

    add("asyncio", "threadbridge", anyio.run(tb_suite, n, backend="asyncio"))
    add("trio", "threadbridge", anyio.run(tb_suite, n, backend="trio"))
    add("asyncio", "anyio.to_process", anyio.run(anyio_suite, n, backend="asyncio"))
    add("trio", "anyio.to_process", anyio.run(anyio_suite, n, backend="trio"))
    try:
        add("trio", "trio-parallel", anyio.run(trio_parallel_suite, n, backend="trio"))
    except ImportError:
        print("(trio-parallel is not installed: pip install trio-parallel)")
    try:
        add("asyncio", "pebble.ProcessPool", anyio.run(pebble_suite, n, backend="asyncio"))
    except ImportError:
        print("(pebble is not installed: pip install pebble)")

    order = [
        "warm no-op",
        "cold first call",
        "first call after a kill",
        "cancel, kill (rung 3)",
        "cancel, SIGTERM (rung 2)",
    ]
    rows.sort(key=lambda r: (order.index(r[2]), r[0], r[1]))
    headers = ("measure", "loop", "library", "time")
    table = [(r[2], r[0], r[1], r[3]) for r in rows]
    print_table(headers, table)
    if args.out:
        save("processes", headers, table, out_dir=args.out, group=0, label=(1, 2), values=(3,))
    print(
        "\nwarm no-op: median of sequential calls. cancel rows: from the cancel to the await"
        "\nreturning; threadbridge has reaped the worker by then."
    )


if __name__ == "__main__":
    main()
