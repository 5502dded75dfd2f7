"""Executor benchmark: ``submit(f).result()`` latency of threadbridge.Executor against
the stdlib's executors, pebble and loky, on threads and on worker processes.

Run by hand, on a quiet machine:

    python benchmarks/executor.py            # full run, a few minutes
    python benchmarks/executor.py --quick    # fewer rounds
    python benchmarks/executor.py --out docs/benchmarks   # also JSON, Markdown and a plot

Every peer is measured in each round, in a new random order (a busy machine's load
changes from second to second); the table gives the median of the rounds and their
spread (lowest to highest). Thread pools are timed three ways: as the scheduler
places their threads, all on one CPU, and the caller on one CPU with the pool's threads
on another (see ``placements()``). The targets are what users write: a function of this script
(which a worker process must import as ``__main__``), a lambda, and a closure. A peer that
cannot run a kind of target (the stdlib's and pebble's process pools pickle by reference:
no lambdas, no closures) says so. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import threadbridge as tb

sys.path.insert(0, str(Path(__file__).parent))
from _table import print_table, save

WORKERS = 4


def in_script(x: int) -> int:
    """A target defined in the user's script."""
    return x + 1


def targets() -> dict[str, Callable[[int], int]]:
    offset = 1
    return {
        "script function": in_script,
        "lambda": lambda x: x + 1,
        "closure": lambda x: x + offset,
    }


def latency_us(submit: Callable[..., cf.Future[Any]], fn: Callable[[int], int], n: int) -> float:
    """Mean µs per sequential submit(fn, i).result()."""
    t0 = time.perf_counter()
    for i in range(n):
        submit(fn, i).result()
    return (time.perf_counter() - t0) / n * 1e6


def thread_peers() -> dict[str, Callable[..., cf.Future[Any]]]:
    import pebble

    stdlib = cf.ThreadPoolExecutor(WORKERS)
    pebble_pool = pebble.ThreadPool(WORKERS)
    ours = tb.Executor(max_workers=WORKERS)
    return {
        "ThreadPoolExecutor": stdlib.submit,
        "pebble.ThreadPool": lambda fn, *args: pebble_pool.schedule(fn, args=args),
        "threadbridge.Executor": ours.submit,
    }


def process_peers() -> dict[str, Callable[..., cf.Future[Any]]]:
    import loky
    import pebble

    stdlib = cf.ProcessPoolExecutor(WORKERS)
    pebble_pool = pebble.ProcessPool(WORKERS)
    loky_pool = loky.get_reusable_executor(max_workers=WORKERS)
    ours = tb.Executor("process", max_workers=WORKERS)
    return {
        "ProcessPoolExecutor": stdlib.submit,
        "pebble.ProcessPool": lambda fn, *args: pebble_pool.schedule(fn, args=args),
        "loky": loky_pool.submit,
        'threadbridge.Executor("process")': ours.submit,
    }


def placements() -> dict[str, Callable[[], None]]:
    """Where the threads run while a thread pool is timed. A call's two threads meet on
    the same CPU or on two (waking a thread on an idle CPU takes tens of µs on a VM), and
    the scheduler picks one or the other for seconds at a time: unpinned, a median says
    which it picked more often. So the threads are also pinned, each way, before every
    timing: one CPU for all; the caller on one and every other thread on another."""
    everywhere = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()

    def pin(caller: set[int], others: set[int]) -> None:
        main = threading.main_thread()
        for thread in threading.enumerate():
            if thread.native_id is not None:
                os.sched_setaffinity(thread.native_id, caller if thread is main else others)

    chosen: dict[str, Callable[[], None]] = {"as scheduled": lambda: pin(everywhere, everywhere)}
    if len(everywhere) >= 2:
        first, second = sorted(everywhere)[:2]
        chosen["one CPU"] = lambda: pin({first}, {first})
        chosen["two CPUs"] = lambda: pin({first}, {second})
    return chosen


def measure(
    backend: str,
    peers: dict[str, Callable[..., cf.Future[Any]]],
    n: int,
    rounds: int,
    rows: list[tuple[str, ...]],
    place: Callable[[], None] | None = None,
) -> None:
    kinds = targets()
    runnable: dict[tuple[str, str], bool] = {}
    for name, submit in peers.items():  # warm up, and find what each peer can run
        for kind, fn in kinds.items():
            try:
                for i in range(50):
                    submit(fn, i).result(timeout=60)
                runnable[(name, kind)] = True
            except Exception:
                runnable[(name, kind)] = False
    results: dict[tuple[str, str], list[float]] = {key: [] for key, ok in runnable.items() if ok}
    for _ in range(rounds):
        order = list(results)
        random.shuffle(order)
        for name, kind in order:
            if place is not None:
                place()  # threads a peer started since are placed too
            results[(name, kind)].append(latency_us(peers[name], kinds[kind], n))
    for kind in kinds:
        for name in peers:
            samples = results.get((name, kind))
            if samples is None:
                rows.append((backend, kind, name, "cannot run it", ""))
                continue
            rows.append(
                (
                    backend,
                    kind,
                    name,
                    f"{statistics.median(samples):.1f} µs",
                    f"{min(samples):.1f} to {max(samples):.1f}",
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--out", help="also write executor.json/.md/.png in this directory")
    args = parser.parse_args()
    rows: list[tuple[str, ...]] = []
    n, rounds = (500, 5) if args.quick else (2000, 15)
    threads = thread_peers()
    chosen = placements()
    for where, place in chosen.items():
        measure(f"threads, {where}", threads, n, rounds, rows, place)
    chosen["as scheduled"]()  # every thread free again
    measure("processes", process_peers(), n // 4, rounds, rows)
    headers = ["backend", "target", "executor", "submit().result()", "spread (µs)"]
    print_table(headers, rows)
    if args.out:
        save("executor", headers, rows, out_dir=args.out, group=0, label=[1, 2], values=[3])


if __name__ == "__main__":
    main()
