"""Deadline benchmark: how long after its deadline a blocking call has really stopped,
for threadbridge.call(timeout=) against func_timeout, stopit and pebble's
concurrent.process(timeout=), on four kinds of blocking work.

Run by hand:

    python benchmarks/deadlines.py            # 3 rounds, a few minutes
    python benchmarks/deadlines.py --quick    # 1 round
    python benchmarks/deadlines.py --out docs/benchmarks   # also JSON, Markdown and a plot

Each trial runs in a fresh interpreter (a thread that no one stopped, or a C call that
holds the GIL, must not spill into the next trial): it calls the work with a deadline of
1 s and measures how long after the deadline the call returned, then whether the work
had really stopped 0.3 s later (its `finally` ran, or its process is gone). A trial
that has not returned 5 s after its deadline is ended from outside: "not stopped". The
work is a function of the trial's own script, as users write it.

The kinds of work:

* checking loop: short sleeps in a loop that asks threadbridge whether to stop (the
  others have no such question: for them it is a loop of short sleeps);
* pure-Python loop: never checks anything;
* time.sleep(60): one blocking call that releases the GIL;
* C call: ``sum(range(10**11))``, one call that holds the GIL throughout.

threadbridge runs with ``Policy(grace=0.05, interrupt_grace=0.5)``; the others stop at
the deadline itself (they have no cooperative step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import print_table, save

DEADLINE = 1.0  # whole seconds: stopit.SignalTimeout rounds down to them
CAP = 5.0  # seconds after the deadline before a trial is called "not stopped"

TRIAL = textwrap.dedent(
    r"""
    import json, os, sys, threading, time

    import threadbridge as tb

    MARK = os.environ["TRIAL_MARK"]  # the work says here where it runs, and that it ended


    def work(KIND):
        with open(MARK, "a") as f:
            f.write(f"{os.getpid()}\n")
        try:
            if KIND == "checking loop":
                while True:
                    tb.check_cancelled()
                    time.sleep(0.001)
            elif KIND == "pure-Python loop":
                n = 0
                while True:
                    n += 1
            elif KIND == "time.sleep":
                time.sleep(60)
            else:
                sum(range(10**11))
        finally:
            with open(MARK, "a") as f:
                f.write("ended\n")


    def run(KIND, TOOL, DEADLINE):
        if TOOL == "threadbridge.call (thread)" or TOOL == "threadbridge.call (process)":
            backend = "process" if "(process)" in TOOL else "thread"
            policy = tb.Policy(grace=0.05, interrupt_grace=0.5)
            try:
                tb.call(work, KIND, timeout=DEADLINE, backend=backend, policy=policy)
            except tb.CallTimeout:
                pass
        elif TOOL == "func_timeout":
            from func_timeout import FunctionTimedOut, func_timeout
            try:
                func_timeout(DEADLINE, work, (KIND,))
            except FunctionTimedOut:
                pass
        elif TOOL == "stopit.ThreadingTimeout":
            import stopit
            with stopit.ThreadingTimeout(DEADLINE):
                work(KIND)
        elif TOOL == "stopit.SignalTimeout":
            import stopit
            with stopit.SignalTimeout(DEADLINE):
                work(KIND)
        elif TOOL == "pebble concurrent.process":
            from concurrent.futures import TimeoutError
            from pebble import concurrent
            try:
                concurrent.process(timeout=DEADLINE)(work)(KIND).result()
            except TimeoutError:
                pass


    if __name__ == "__main__":
        KIND, TOOL, DEADLINE = sys.argv[1], sys.argv[2], float(sys.argv[3])
        # Imports and warm-up before the clock starts: a running service has done them.
        if TOOL.startswith("threadbridge"):
            tb.call(int, "1", backend="process" if "(process)" in TOOL else "thread")
        elif TOOL == "func_timeout":
            import func_timeout
        elif TOOL.startswith("stopit"):
            import stopit
        else:
            import pebble
        start = time.perf_counter()
        run(KIND, TOOL, DEADLINE)
        returned = time.perf_counter() - start - DEADLINE
        time.sleep(0.3)
        lines = open(MARK).read().split()
        ended = "ended" in lines
        pid = int(lines[0]) if lines else None
        gone = False  # the work's own process: it is gone if it was killed
        if pid is not None and pid != os.getpid():
            import psutil
            try:
                gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
        still = not (ended or gone)
        print(json.dumps([returned, still]), flush=True)
        os._exit(0)  # a thread left running must not hold the exit up
    """
)

TOOLS = [
    "threadbridge.call (thread)",
    "threadbridge.call (process)",
    "func_timeout",
    "stopit.ThreadingTimeout",
    "stopit.SignalTimeout",
    "pebble concurrent.process",
]
KINDS = ["checking loop", "pure-Python loop", "time.sleep", "C call"]


def trial(script: Path, kind: str, tool: str) -> tuple[float | None, bool]:
    """(seconds from the deadline to the return, or None: not within CAP; still running)."""
    mark = script.with_suffix(".mark")
    mark.unlink(missing_ok=True)
    try:
        done = subprocess.run(
            [sys.executable, str(script), kind, tool, str(DEADLINE)],
            capture_output=True,
            text=True,
            timeout=DEADLINE + CAP + 10,  # its start-up, and the 0.3 s look afterwards
            env={**os.environ, "TRIAL_MARK": str(mark)},
        )
    except subprocess.TimeoutExpired:
        return None, True
    lines = done.stdout.strip().splitlines()
    if not lines:
        return None, True
    returned, still = json.loads(lines[-1])
    if returned > CAP:
        return None, True
    return returned, still


def cells(samples: list[tuple[float | None, bool]]) -> tuple[str, str, str]:
    """(stopped after, spread, what happened otherwise) for one tool and kind of work."""
    returned = [s for s, _ in samples if s is not None]
    if any(still for _, still in samples) or len(returned) < len(samples):
        if returned:
            late = statistics.median(returned) * 1000
            return "-", "", f"returned at {late:.0f} ms; the work ran on"
        return "-", "", f"not stopped in {CAP:.0f} s"
    ms = [s * 1000 for s in returned]
    spread = f"{min(ms):.0f} to {max(ms):.0f}" if len(ms) > 1 else ""
    return f"{statistics.median(ms):.0f} ms", spread, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--out", help="also write deadlines.json/.md/.png in this directory")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    results: dict[tuple[str, str], list[tuple[float | None, bool]]] = {}
    with tempfile.TemporaryDirectory() as temp:
        script = Path(temp) / "deadline_trial.py"
        script.write_text(TRIAL)
        for _ in range(rounds):
            order = [(k, t) for k in KINDS for t in TOOLS]
            random.shuffle(order)
            for kind, tool in order:
                results.setdefault((kind, tool), []).append(trial(script, kind, tool))
    rows = [(kind, tool, *cells(results[(kind, tool)])) for kind in KINDS for tool in TOOLS]
    headers = ["work", "tool", "stopped after the deadline", "spread (ms)", "otherwise"]
    print_table(headers, rows)
    if args.out:
        save("deadlines", headers, rows, out_dir=args.out, group=0, label=[1], values=[2], note=4)


if __name__ == "__main__":
    main()
