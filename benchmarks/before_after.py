"""Compare two source trees of threadbridge on the figures that must not regress.

Run by hand, for a change to the core:

    git worktree add /tmp/before main
    python benchmarks/before_after.py --before /tmp/before/src --rounds 10

Each round runs one fresh interpreter per tree, alternating, so both see the same machine
load; each interpreter measures the no-op thread latency and the warm no-op process
latency (a stdlib function, which the worker imports) on asyncio and on trio, as the best
of five batches. The table shows the median over rounds and the change. Nothing here is
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import print_table

MEASURE = r"""
import json, statistics, sys, time
import anyio, threadbridge as tb

def noop():
    return None

async def latency(backend, func, n, rounds):
    for _ in range(50):
        await tb.run_killable(func, backend=backend)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            await tb.run_killable(func, backend=backend)
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return min(samples)  # the least disturbed of the rounds

async def main():
    return {
        "thread": await latency("thread", noop, 2000, 5),
        "process": await latency("process", int, 300, 5),
    }

out = {}
for loop in ("asyncio", "trio"):
    for what, value in anyio.run(main, backend=loop).items():
        out[f"{loop} {what}"] = value
print(json.dumps(out))
"""


def measure(src: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the src/ folder of the old tree")
    parser.add_argument("--after", default=str(Path(__file__).parent.parent / "src"))
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    before: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for tree, into in ((args.before, before), (args.after, after)):
            for key, value in measure(tree).items():
                into.setdefault(key, []).append(value)
    rows = []
    for key in before:
        b, a = statistics.median(before[key]), statistics.median(after[key])
        rows.append(
            (
                key + " no-op",
                f"{b:.1f} µs ± {_spread(before[key]):.1f}",
                f"{a:.1f} µs ± {_spread(after[key]):.1f}",
                f"{(a - b) / b * 100:+.1f}%",
            )
        )
    print_table(("what", "before (median ± IQR/2)", "after", "change"), rows)


def _spread(values: list[float]) -> float:
    """Half the interquartile range: the spread of the rounds around their median."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


if __name__ == "__main__":
    main()
