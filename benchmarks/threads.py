"""Thread backend benchmark: threadbridge against asyncio, anyio and trio thread helpers.

Run by hand, on a quiet machine (each round measures every peer once, in a random order):

    python benchmarks/threads.py            # full run, ~1 minute
    python benchmarks/threads.py --quick    # fewer rounds

It prints one table. Figures are medians of several rounds; lower is better except for
calls/s. Nothing here is asserted: the test suite checks behaviour, not speed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import trio

import threadbridge as tb

sys.path.insert(0, str(Path(__file__).parent))
from _table import print_table, save

Call = Callable[[Callable[[], Any]], Awaitable[Any]]


def noop() -> None:
    return None


async def latency_us(call: Call, n: int) -> float:
    """Mean µs per call over ``n`` sequential calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        await call(noop)
    return (time.perf_counter() - t0) / n * 1e6


async def throughput(call: Call, n: int, callers: int = 40) -> float:
    """Calls per second, ``n`` calls made by ``callers`` concurrent tasks."""

    async def worker(k: int) -> None:
        for _ in range(k):
            await call(noop)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(worker, n // callers)
    return n / (time.perf_counter() - t0)


async def side_by_side(
    peers: list[tuple[str, Call]], n: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """Median latency and throughput of each peer. Each round measures every peer once,
    in a new random order, so that each sees the machine at the same moments (a busy
    machine's load changes from second to second)."""
    for _, call in peers:
        for _ in range(200):
            await call(noop)
    latency: dict[str, list[float]] = {name: [] for name, _ in peers}
    calls: dict[str, list[float]] = {name: [] for name, _ in peers}
    order = list(peers)
    for _ in range(rounds):
        random.shuffle(order)
        for name, call in order:
            latency[name].append(await latency_us(call, n))
            calls[name].append(await throughput(call, n))
    return {
        name: (statistics.median(latency[name]), statistics.median(calls[name]))
        for name, _ in peers
    }


class StopTiming:
    """Times from the cancel to the await returning, and to the target really ending."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended_at: float | None = None

    def mark_end(self) -> None:
        self.ended_at = time.perf_counter()


async def _time_cancel(
    start: Callable[[StopTiming], Awaitable[Any]], wait_end: float
) -> tuple[float, float | None]:
    timing = StopTiming()
    t_cancel = 0.0
    async with anyio.create_task_group() as tg:

        async def runner() -> None:
            await start(timing)

        tg.start_soon(runner)
        while not timing.started.is_set():
            await anyio.sleep(0.001)
        await anyio.sleep(0.02)
        t_cancel = time.perf_counter()
        tg.cancel_scope.cancel()
    returned = time.perf_counter() - t_cancel
    deadline = time.perf_counter() + wait_end
    while timing.ended_at is None and time.perf_counter() < deadline:
        await anyio.sleep(0.001)
    stopped = None if timing.ended_at is None else max(0.0, timing.ended_at - t_cancel)
    return returned * 1000, None if stopped is None else stopped * 1000


def cooperative_tb(timing: StopTiming) -> None:
    timing.started.set()
    try:
        while not tb.cancel_requested():
            pass
    finally:
        timing.mark_end()


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def pure_loop(timing: StopTiming, stop: threading.Event) -> None:
    timing.started.set()
    try:
        _spin(stop)
    finally:
        timing.mark_end()


def cooperative_anyio(timing: StopTiming) -> None:
    timing.started.set()
    try:
        while True:
            anyio.from_thread.check_cancelled()
    finally:
        timing.mark_end()


def cooperative_trio(timing: StopTiming) -> None:
    timing.started.set()
    try:
        while True:
            trio.from_thread.check_cancelled()
    finally:
        timing.mark_end()


POLICY = tb.Policy(grace=0.1, interrupt_grace=1.0)


def fmt_ms(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} ms"


async def suite(loop: str, quick: bool, rows: list[tuple[str, ...]]) -> None:
    n, rounds = (1000, 5) if quick else (2000, 15)
    peers: list[tuple[str, Call]] = [("threadbridge.run_killable", tb.run_killable)]
    if loop == "asyncio":
        peers.append(("asyncio.to_thread", asyncio.to_thread))
    peers.append(("anyio.to_thread.run_sync", anyio.to_thread.run_sync))
    if loop == "trio":
        peers.append(("trio.to_thread.run_sync", trio.to_thread.run_sync))
    measured = await side_by_side(peers, n, rounds)
    for name, (lat, thr) in measured.items():
        rows.append((loop, name, "no-op call", f"{lat:.1f} µs/call", f"{thr:,.0f} calls/s"))

    # Cancelling: a cooperative target and a pure-Python loop that never checks.
    returned, stopped = await _time_cancel(
        lambda t: tb.run_killable(cooperative_tb, t, policy=POLICY), 2
    )
    rows.append((loop, "threadbridge", "cancel cooperative", fmt_ms(returned), fmt_ms(stopped)))
    stop = threading.Event()
    returned, stopped = await _time_cancel(
        lambda t: tb.run_killable(pure_loop, t, stop, policy=POLICY), 2
    )
    stop.set()
    rows.append(
        (loop, "threadbridge (grace 0.1 s)", "cancel pure loop", fmt_ms(returned), fmt_ms(stopped))
    )

    def add(name: str, measure: str, result: tuple[float, float | None]) -> None:
        rows.append((loop, name, measure, fmt_ms(result[0]), fmt_ms(result[1])))

    add(
        "anyio (from_thread.check)",
        "cancel cooperative",
        await _time_cancel(lambda t: anyio.to_thread.run_sync(cooperative_anyio, t), 2),
    )
    stop = threading.Event()
    add(
        "anyio (abandon_on_cancel)",
        "cancel pure loop",
        await _time_cancel(
            lambda t: anyio.to_thread.run_sync(pure_loop, t, stop, abandon_on_cancel=True), 1
        ),
    )
    stop.set()
    if loop == "asyncio":
        stop = threading.Event()
        add(
            "asyncio.to_thread",
            "cancel pure loop",
            await _time_cancel(lambda t: asyncio.to_thread(pure_loop, t, stop), 1),
        )
        stop.set()
    if loop == "trio":
        add(
            "trio (from_thread.check)",
            "cancel cooperative",
            await _time_cancel(lambda t: trio.to_thread.run_sync(cooperative_trio, t), 2),
        )


def cancel_requested_cost() -> float:
    number = 2_000_000
    best = min(timeit.repeat(tb.cancel_requested, number=number, repeat=5))
    return best / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", metavar="DIR", help="also write threads.json and threads.png")
    args = parser.parse_args()
    rows: list[tuple[str, ...]] = []
    for loop in ("asyncio", "trio"):
        anyio.run(suite, loop, args.quick, rows, backend=loop)
    cost = f"{cancel_requested_cost():.0f} ns"
    rows.append(("-", "threadbridge", "cancel_requested()", cost, ""))
    headers = ("loop", "what", "measure", "latency / returned", "throughput / stopped")
    print_table(headers, rows)
    if args.out:
        save(
            "threads",
            headers,
            rows,
            out_dir=args.out,
            group=2,
            label=(0, 1),
            values=(3, 4),
        )
    print(
        "\nno-op rows: µs per sequential call, and calls/s with 40 concurrent callers; the"
        "\nmedian of interleaved rounds (every peer once per round, in a random order)."
        "\ncancel rows: time from the cancel to the await returning, and to the target really"
        "\nending ('never': still running 1-2 s later)."
    )


if __name__ == "__main__":
    main()
