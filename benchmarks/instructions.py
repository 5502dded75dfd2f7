"""Compare two source trees of threadbridge by the CPU instructions a warm call costs.

Run by hand, for a change to the core, where timings are too noisy to tell a few per cent
(a shared machine, a CI runner):

    git worktree add /tmp/before main
    python benchmarks/instructions.py --before /tmp/before/src

Each figure is counted by valgrind's callgrind, which counts instructions rather than
time: the same for the same code, whatever else the machine does. A run makes ``n``
calls after a warm-up; the cost of one call is the difference between a long run and a
short one, divided by the difference in calls, so start-up and imports cancel out. All
the process's threads are counted (the loop's and the pool's); for the process backend
only the parent is (a worker is another program). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import print_table

PROGRAM = r"""
import sys, anyio, threadbridge as tb
backend, loop, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def noop():
    return None

async def main():
    target = noop if backend == "thread" else int  # int: a stdlib target the worker has
    for _ in range(50):
        await tb.run_killable(target, backend=backend)
    for _ in range(n):
        await tb.run_killable(target, backend=backend)

anyio.run(main, backend=loop)
"""

CALLS = {"thread": (200, 1200), "process": (100, 600)}


def instructions(src: str, script: str, backend: str, loop: str, n: int) -> int:
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [
            *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
            *(sys.executable, script, backend, loop, str(n)),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{done.stderr}")
    return int(found.group(1))


def rounds_from_args(doc: str, default: int) -> int:
    """The ``--rounds`` of a benchmark that counts instructions (how many measurements
    of each figure); exits with a message if valgrind is missing."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=default,
        help="measurements of each figure (the table gives their median and range)",
    )
    rounds: int = parser.parse_args().rounds
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    return rounds


def per_call_rounds(
    program: str, kinds: Iterable[str], loop: str, calls: tuple[int, int], rounds: int
) -> dict[str, list[float]]:
    """Instructions per call of ``program`` (run as ``program KIND LOOP N``) for each
    kind, ``rounds`` times, round by round with every kind in each (how threads meet
    under valgrind moves a count by a few thousand from one run to the next), with the
    checkout's threadbridge. ``calls``: the short and the long run's numbers of calls."""
    src = str(Path(__file__).parent.parent / "src")
    short, long = calls
    costs: dict[str, list[float]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        script = str(Path(tmp) / "calls.py")
        Path(script).write_text(program)
        for _ in range(rounds):
            for kind in costs:
                more = instructions(src, script, kind, loop, long)
                costs[kind].append(
                    (more - instructions(src, script, kind, loop, short)) / (long - short)
                )
    return costs


def figures(values: list[float]) -> tuple[str, str]:
    """A count's median and range, in thousands, for a table."""
    return (
        f"{statistics.median(values) / 1000:.1f} k",
        f"{min(values) / 1000:.1f} to {max(values) / 1000:.1f} k",
    )


def per_call(src: str, script: str, backend: str, loop: str) -> float:
    short, long = CALLS[backend]
    return (
        instructions(src, script, backend, loop, long)
        - instructions(src, script, backend, loop, short)
    ) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the src/ folder of the old tree")
    parser.add_argument("--after", default=str(Path(__file__).parent.parent / "src"))
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        script = str(Path(tmp) / "calls.py")
        Path(script).write_text(PROGRAM)
        rows = []
        for loop in ("asyncio", "trio"):
            for backend in ("thread", "process"):
                b = per_call(args.before, script, backend, loop)
                a = per_call(args.after, script, backend, loop)
                rows.append(
                    (
                        f"{loop} {backend} no-op",
                        f"{b / 1000:.1f} k",
                        f"{a / 1000:.1f} k",
                        f"{(a - b) / b * 100:+.1f}%",
                    )
                )
    print(f"Python {sys.version.split()[0]}: instructions per warm call (callgrind)")
    print_table(("what", "before", "after", "change"), rows)


if __name__ == "__main__":
    main()
