"""How ``threadbridge.Executor`` compares with ``ThreadPoolExecutor`` on this Python: the
ratio of their ``submit(f).result()`` latencies, threads pinned, with nothing but the
standard library and threadbridge needed (run it with each Python in turn).

Run by hand, on a quiet machine:

    python benchmarks/executor_ratio.py              # 3 runs of 31 rounds, each placement
    python3.10 benchmarks/executor_ratio.py --quick  # with threadbridge importable there

Both executors have 4 workers and run a function of this script. A round times 2,000
calls of each, one after the other in a random order, and gives their ratio (the
Executor's time over the stdlib's; below 1 is faster). Pairing the two in each round
leaves out what drifts between rounds (a neighbour's load on a VM); the table gives, per
run, the median ratio of its rounds and their middle half (the quartiles). Threads are
pinned as in benchmarks/executor.py: all on one CPU, or the caller on one CPU and the
pools' threads on another (there every call wakes a sleeping CPU twice, and a round's
ratio varies by several per cent). Nothing here is asserted.
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
from _table import print_table
from executor import WORKERS, in_script, placements


def per_call_us(submit: Callable[..., cf.Future[Any]], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        submit(in_script, i).result()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of 11 rounds")
    args = parser.parse_args()
    runs, rounds, n = (1, 11, 1000) if args.quick else (3, 31, 2000)
    stdlib = cf.ThreadPoolExecutor(WORKERS)
    ours = tb.Executor(max_workers=WORKERS)
    peers: dict[str, Callable[..., cf.Future[Any]]] = {
        "stdlib": stdlib.submit,
        "threadbridge": ours.submit,
    }
    for submit in peers.values():  # warm up: every worker started
        for i in range(200):
            submit(in_script, i).result()
    rows = []
    chosen = placements()
    for where in ("one CPU", "two CPUs"):
        if where not in chosen:
            continue  # a single CPU: nothing to pin
        for run in range(1, runs + 1):
            chosen[where]()
            ratios: list[float] = []
            times: dict[str, list[float]] = {name: [] for name in peers}
            for _ in range(rounds):
                order = list(peers)
                random.shuffle(order)
                got = {name: per_call_us(peers[name], n) for name in order}
                for name, us in got.items():
                    times[name].append(us)
                ratios.append(got["threadbridge"] / got["stdlib"])
            low, _, high = statistics.quantiles(ratios, n=4)
            rows.append(
                (
                    where,
                    str(run),
                    f"{statistics.median(times['stdlib']):.2f} µs",
                    f"{statistics.median(times['threadbridge']):.2f} µs",
                    f"{statistics.median(ratios):.3f}",
                    f"{low:.3f} to {high:.3f}",
                )
            )
    chosen["as scheduled"]()
    stdlib.shutdown()
    ours.shutdown()
    version = sys.version.split()[0]
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    print(f"Python {version}{'' if gil else ' (free-threaded)'}: Executor / ThreadPoolExecutor")
    headers = ["placement", "run", "ThreadPoolExecutor", "Executor", "ratio", "middle half"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
