"""Where an Executor's thread call goes: CPU instructions per ``submit(f).result()``
(callgrind, as benchmarks/instructions.py counts them), for ``ThreadPoolExecutor``,
``threadbridge.Executor``, and the same round trip through threadbridge's thread pool
alone (a ``threadbridge.Future`` settled by the pool thread, no ladder): the difference of
the last two is what the ladder's per-call objects and steps cost.

Run by hand (needs valgrind):

    python benchmarks/executor_instructions.py [--rounds 3]

Each figure is the median of the rounds (how the two threads meet under valgrind moves a
count by a few thousand from one run to the next). Nothing here is asserted.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import print_table
from instructions import figures, per_call_rounds, rounds_from_args

PROGRAM = r"""
import sys
kind, _, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def f():
    return 1

if kind == "stdlib":
    from concurrent.futures import ThreadPoolExecutor
    submit = ThreadPoolExecutor().submit
elif kind == "executor":
    import threadbridge as tb
    submit = tb.Executor().submit
else:  # threadbridge's pool alone: what every thread call rides on
    from threadbridge._future import Future
    from threadbridge._thread import backend

    pool = backend().pool

    class Work:
        __slots__ = ("fn", "future", "key", "submitted", "ticket")

        def __init__(self, future, fn):
            self.key = next(pool.numbers)
            self.ticket = None
            self.submitted = False
            self.future, self.fn = future, fn

        def run(self, thread_id, slot):
            pool.finished(self, abandoned=False)
            self.future.set_result(self.fn())
            return True

    def submit(fn):
        future = Future()
        pool.submit(Work(future, fn))
        return future

for _ in range(100):
    submit(f).result()
for _ in range(n):
    submit(f).result()
"""

KINDS = {
    "stdlib": "ThreadPoolExecutor",
    "executor": "threadbridge.Executor",
    "pool": "threadbridge's thread pool alone (no ladder)",
}


def main() -> None:
    rounds = rounds_from_args(__doc__, 3)
    # The difference of 1,300 and 300 calls, per call: start-up and imports cancel out.
    costs = per_call_rounds(PROGRAM, KINDS, "-", (300, 1300), rounds)
    base = statistics.median(costs["stdlib"])
    rows = [
        (what, *figures(costs[kind]), f"{statistics.median(costs[kind]) / base:.2f}")
        for kind, what in KINDS.items()
    ]
    print(
        f"Python {sys.version.split()[0]}: instructions per submit(f).result() on threads "
        f"(callgrind, both threads), median of {rounds} rounds"
    )
    print_table(("what", "per call", "range", "/ stdlib"), rows)


if __name__ == "__main__":
    main()
