"""Process backend benchmark: threadbridge against anyio.to_process, trio-parallel and pebble.

Run by hand (needs the "bench" extra: trio-parallel and pebble):

    python benchmarks/processes.py            # 5 interleaved rounds, a few minutes
    python benchmarks/processes.py --quick    # 2 rounds
    python benchmarks/processes.py --out docs/benchmarks   # also JSON, Markdown, a chart

Targets as users write them: a function of an importable module, a function of this
script (``__main__``), and a lambda; and a function of this script that uses an 8 MB
global. Measured for each library that can run them:

* warm no-op call latency (median of sequential calls on a warm pool);
* a call of the script's function that reads the 8 MB global;
* the first call after a worker was killed by a cancellation (each kind of target);
* cancel -> await returns: straight to the kill (rung 3), and for threadbridge also rung
  2 (SIGTERM interrupting a sleeping target), with the worker reaped when it returns;
* the first call of a fresh script (a new interpreter running a small script whose
  target is its own function; the call's own time, the script's imports excluded).

Measure an installed (compiled) threadbridge: from a checkout where PYTHONDONTWRITEBYTECODE
is set, run `python -m compileall src` first, or every worker compiles it anew.

Each round runs every library once, in turn, so that all see the same machine; the table
shows the median over rounds. Peers are run with their kill-on-cancel option
(``cancellable=True``, ``kill_on_cancel=True``): by default they wait for the target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import textwrap
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

BIG = bytes(8_000_000)


def noop_main() -> None:
    return None


def uses_big() -> int:
    return len(BIG)


KINDS: dict[str, Callable[[], object]] = {
    "module": targets.noop,
    "__main__": noop_main,
    "lambda": lambda: None,
}

Call = Callable[[Callable[..., object]], Awaitable[object]]
Results = dict[str, float | None]  # None: the library cannot run it


async def warm_latency(call: Call, func: Callable[..., object], n: int) -> float | None:
    try:
        for _ in range(20):
            await call(func)
    except Exception as exc:
        print(f"cannot: {exc!r:.300}", file=sys.stderr)
        return None  # e.g. a lambda that plain pickle cannot carry
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call(func)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def timed(call: Call, func: Callable[..., object]) -> float | None:
    t0 = time.perf_counter()
    try:
        await call(func)
    except Exception:
        return None
    return time.perf_counter() - t0


async def cancel_time(start: Callable[[], Coroutine[Any, Any, Any]], settle: float = 0.3) -> float:
    """From cancelling a call that is well under way to the await returning."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(start)
        await anyio.sleep(settle)
        t0 = time.perf_counter()
        tg.cancel_scope.cancel()
    return time.perf_counter() - t0


async def suite(call: Call, kill: Callable[[], Coroutine[Any, Any, Any]], n: int) -> Results:
    out: Results = {}
    await call(targets.noop)
    await anyio.sleep(0.5)  # let a standby worker finish starting, where there is one
    for kind, func in KINDS.items():
        out[f"warm no-op, {kind}"] = await warm_latency(call, func, n)
    out["8 MB global, __main__"] = await warm_latency(call, uses_big, max(n // 10, 20))
    kills = []
    for kind, func in KINDS.items():
        kills.append(await cancel_time(kill))
        out[f"first call after a kill, {kind}"] = await timed(call, func)
        await anyio.sleep(0.5)  # the next kill starts from a settled pool
    out["cancel, kill (rung 3)"] = statistics.median(kills)
    return out


async def threadbridge_suite(n: int) -> Results:
    async def call(func: Callable[..., object]) -> object:
        return await tb.run_killable(func, backend="process")

    async def kill() -> None:
        await tb.run_killable(targets.sleep_long, backend="process", policy=KILL_NOW)

    out = await suite(call, kill, n)
    out["cancel, SIGTERM (rung 2)"] = await cancel_time(
        lambda: tb.run_killable(targets.sleep_long, backend="process", policy=SIGTERM_NOW)
    )
    return out


async def anyio_suite(n: int) -> Results:
    async def call(func: Callable[..., object]) -> object:
        return await anyio.to_process.run_sync(func, cancellable=True)

    async def kill() -> None:
        await anyio.to_process.run_sync(targets.sleep_long, cancellable=True)

    return await suite(call, kill, n)


async def trio_parallel_suite(n: int) -> Results:
    import trio_parallel

    async with trio_parallel.open_worker_context() as ctx:

        async def call(func: Callable[..., object]) -> object:
            return await ctx.run_sync(func, kill_on_cancel=True)

        async def kill() -> None:
            await ctx.run_sync(targets.sleep_long, kill_on_cancel=True)

        return await suite(call, kill, n)


async def pebble_suite(n: int) -> Results:
    import pebble

    pool = pebble.ProcessPool(max_workers=2)
    try:

        async def call(func: Callable[..., object]) -> object:
            return await asyncio.wrap_future(pool.schedule(func))

        async def kill() -> None:
            future = pool.schedule(targets.sleep_long)
            try:
                await asyncio.shield(asyncio.wrap_future(future))
            except BaseException:
                future.cancel()  # pebble terminates the worker
                while future.running():  # wait until pebble has dealt with it
                    await asyncio.sleep(0.001)
                raise

        return await suite(call, kill, n)
    finally:
        pool.stop()
        pool.join()


# --- the first call of a fresh script ------------------------------------------------------

FRESH = {
    "threadbridge": "await tb.run_killable(noop, backend='process')",
    "anyio.to_process": "await anyio.to_process.run_sync(noop, cancellable=True)",
    "trio-parallel": "await trio_parallel.run_sync(noop, kill_on_cancel=True)",
    "pebble.ProcessPool": "await asyncio.wrap_future(pool.schedule(noop))",
}

FRESH_SCRIPT = """
import asyncio, sys, time
import anyio, anyio.to_process
{imports}

def noop():
    return None

async def main():
    t0 = time.perf_counter()
    {call}
    print(time.perf_counter() - t0)

if __name__ == "__main__":
    {setup}
    anyio.run(main, backend={loop!r})
    {teardown}
"""


def fresh_script(library: str, loop: str, folder: Path) -> float | None:
    imports, setup, teardown = "", "", ""
    if library == "threadbridge":
        imports = "import threadbridge as tb"
    elif library == "trio-parallel":
        imports = "import trio_parallel"
    elif library == "pebble.ProcessPool":
        imports = "import pebble"
        setup = "pool = pebble.ProcessPool(max_workers=2)"
        teardown = "pool.stop(); pool.join()"
    source = FRESH_SCRIPT.format(
        imports=imports, call=FRESH[library], setup=setup, teardown=teardown, loop=loop
    )
    script = folder / "fresh_script.py"
    script.write_text(textwrap.dedent(source))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=folder
    )
    if done.returncode != 0:
        return None
    return float(done.stdout.strip().splitlines()[-1])


# --- the run --------------------------------------------------------------------------------

LIBRARIES: list[tuple[str, str, Callable[[int], Coroutine[Any, Any, Results]]]] = [
    ("asyncio", "threadbridge", threadbridge_suite),
    ("trio", "threadbridge", threadbridge_suite),
    ("asyncio", "anyio.to_process", anyio_suite),
    ("trio", "anyio.to_process", anyio_suite),
    ("trio", "trio-parallel", trio_parallel_suite),
    ("asyncio", "pebble.ProcessPool", pebble_suite),
]


def available(library: str) -> bool:
    module = {"trio-parallel": "trio_parallel", "pebble.ProcessPool": "pebble"}.get(library)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        print(f"({library} is not installed: pip install -e '.[bench]')")
        return False
    return True


def ms(seconds: float | None) -> str:
    return "cannot" if seconds is None else f"{seconds * 1000:.2f} ms"


def main() -> None:
    # Rung 3 is what the cancel rows measure: its warning is expected here.
    logging.getLogger("threadbridge").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (5; --quick: 2)")
    parser.add_argument("--out", metavar="DIR", help="also write processes.json/.md/.png")
    args = parser.parse_args()
    n = 200 if args.quick else 1000
    rounds = args.rounds or (2 if args.quick else 5)
    libraries = [entry for entry in LIBRARIES if available(entry[1])]
    samples: dict[tuple[str, str, str], list[float | None]] = {}
    folder = Path(__import__("tempfile").mkdtemp())
    for number in range(1, rounds + 1):
        print(f"round {number} of {rounds}", file=sys.stderr)
        for loop, library, run in libraries:
            results = anyio.run(run, n, backend=loop)
            results["first call of a fresh script"] = fresh_script(library, loop, folder)
            for measure, value in results.items():
                samples.setdefault((measure, loop, library), []).append(value)

    def median(values: list[float | None]) -> float | None:
        numbers = [v for v in values if v is not None]
        return statistics.median(numbers) if len(numbers) == len(values) else None

    order = [
        *(f"warm no-op, {kind}" for kind in KINDS),
        "8 MB global, __main__",
        "first call of a fresh script",
        *(f"first call after a kill, {kind}" for kind in KINDS),
        "cancel, kill (rung 3)",
        "cancel, SIGTERM (rung 2)",
    ]
    keys = sorted(samples, key=lambda k: (order.index(k[0]), k[1], k[2]))
    headers = ("measure", "loop", "library", "time")
    table = [(m, loop, lib, ms(median(samples[(m, loop, lib)]))) for m, loop, lib in keys]
    print_table(headers, table)
    if args.out:
        plotted = [row for row in table if row[3] != "cannot"]
        save("processes", headers, plotted, out_dir=args.out, group=0, label=(1, 2), values=(3,))
        raw = Path(args.out) / "processes-samples.json"
        raw.write_text(json.dumps({" | ".join(k): v for k, v in samples.items()}, indent=1))
    print(
        f"\nmedian of {rounds} interleaved rounds. warm rows: median of {n} sequential calls."
        "\ncancel rows: from the cancel to the await returning (threadbridge has reaped the"
        "\nworker by then). 'cannot': the library could not run that target."
    )


if __name__ == "__main__":
    main()
