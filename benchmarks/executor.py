"""Executor benchmark: ``submit(f).result()`` latency of threadbridge.Executor against
the stdlib's executors, pebble and loky, on threads and on worker processes.

Run by hand, on a quiet machine:

    python benchmarks/executor.py            # full run, a few minutes
    python benchmarks/executor.py --quick    # fewer rounds
    python benchmarks/executor.py --out docs/benchmarks   # also JSON, Markdown and a plot

Every peer is measured in each round, in a new random order (a busy machine's load
changes from second to second); the table gives the median of the rounds and their
spread (lowest to highest). The targets are what users write: a function of this script
(which a worker process must import as ``__main__``), a lambda, and a closure. A peer that
cannot run a kind of target (the stdlib's and pebble's process pools pickle by reference:
no lambdas, no closures) says so. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import random
import statistics
import sys
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


def measure(
    backend: str,
    peers: dict[str, Callable[..., cf.Future[Any]]],
    n: int,
    rounds: int,
    rows: list[tuple[str, ...]],
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
    measure("threads", thread_peers(), n, rounds, rows)
    measure("processes", process_peers(), n // 4, rounds, rows)
    headers = ["backend", "target", "executor", "submit().result()", "spread (µs)"]
    print_table(headers, rows)
    if args.out:
        save("executor", headers, rows, out_dir=args.out, group=0, label=[1, 2], values=[3])


if __name__ == "__main__":
    main()
