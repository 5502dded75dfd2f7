"""Process backend benchmark: threadbridge against anyio.to_process, trio-parallel and pebble.

Run by hand (needs the "bench" extra: trio-parallel and pebble):

    python benchmarks/processes.py            # 5 interleaved rounds, a few minutes
    python benchmarks/processes.py --quick    # 2 rounds
    python benchmarks/processes.py --out docs/benchmarks   # also JSON, Markdown, a chart

Targets as users write them: a function of an importable module, a function of this
script (``__main__``), and a lambda; and a function of this script that uses an 8 MB
global. Measured for each library that can run them:

* warm no-op call latency on a warm pool, side by side: the libraries that run on a loop
  are all open in one event loop, and their calls alternate (every library and kind
  of target in a new random order each turn), so that each sees the same machine at
  the same moments; the median per library and target;
* likewise, a call of the script's function that reads the 8 MB global;
* the first call after a worker was killed by a cancellation (each kind of target);
* cancel -> await returns: straight to the kill (rung 3), and for threadbridge also rung
  2 (SIGTERM interrupting a sleeping target), with the worker reaped when it returns
  (pebble's future is cancelled before its worker is stopped: for pebble, the time
  until the worker has stopped);
* the first call of a fresh script (a new interpreter running a small script whose
  target is its own function), timed from the library's import to the first result:
  threadbridge imports its parts at the first call, the peers at their import.

threadbridge is compiled first (as pip does on install): a checkout run with
PYTHONDONTWRITEBYTECODE set would otherwise be compiled anew by every worker.

Each round runs the side-by-side warm calls on each loop, then every library's cancel and
cold-start measures once, in turn, so that all see the same machine; the table shows the
median over rounds. Peers are run with their kill-on-cancel option
(``cancellable=True``, ``kill_on_cancel=True``): by default they wait for the target.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import logging
import random
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
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

Call = Callable[[Callable[..., object]], Coroutine[Any, Any, object]]
Results = dict[str, float | None]  # None: the library cannot run it


# --- warm calls, side by side ------------------------------------------------------------


@asynccontextmanager
async def threadbridge_pool() -> AsyncIterator[Call]:
    yield lambda func: tb.run_killable(func, backend="process")


@asynccontextmanager
async def anyio_pool() -> AsyncIterator[Call]:
    yield lambda func: anyio.to_process.run_sync(func, cancellable=True)


@asynccontextmanager
async def trio_parallel_pool() -> AsyncIterator[Call]:
    import trio_parallel

    async with trio_parallel.open_worker_context() as ctx:
        yield lambda func: ctx.run_sync(func, kill_on_cancel=True)


@asynccontextmanager
async def pebble_pool() -> AsyncIterator[Call]:
    import pebble

    pool = pebble.ProcessPool(max_workers=2)
    try:

        async def call(func: Callable[..., object]) -> object:
            return await asyncio.wrap_future(pool.schedule(func))

        yield call
    finally:
        pool.stop()
        pool.join()


POOLS = {
    "threadbridge": threadbridge_pool,
    "anyio.to_process": anyio_pool,
    "trio-parallel": trio_parallel_pool,
    "pebble.ProcessPool": pebble_pool,
}
WARM = {f"warm no-op, {kind}": func for kind, func in KINDS.items()}
WARM["8 MB global, __main__"] = uses_big


async def side_by_side(libraries: list[str], n: int) -> dict[tuple[str, str], float | None]:
    """Warm call latency of every library on this loop, their calls interleaved."""
    async with AsyncExitStack() as stack:
        calls = {name: await stack.enter_async_context(POOLS[name]()) for name in libraries}
        for call in calls.values():
            await call(targets.noop)
        await anyio.sleep(0.5)  # let a standby worker finish starting, where there is one
        samples: dict[tuple[str, str], list[float] | None] = {}
        for measure, func in WARM.items():
            for name, call in calls.items():
                try:
                    for _ in range(20):
                        await call(func)
                    samples[measure, name] = []
                except Exception as exc:
                    print(f"{name} cannot: {exc!r:.300}", file=sys.stderr)
                    samples[measure, name] = None  # a lambda that plain pickle cannot carry
        # A call pays for what the call before it left running (pebble's threads finish
        # their work after its future is set): every call (a library and a kind of
        # target) takes its turn in a new random order each time, so that each follows
        # each other one equally often. A fixed or rotating order would not do: some
        # call would always follow the same one.
        shuffle = random.Random(0).shuffle
        for i in range(n):
            turn = [
                (measure, name)
                for (measure, name), values in samples.items()
                if values is not None and (i % 10 == 0 or not measure.startswith("8 MB"))
            ]  # a tenth as many 8 MB calls: each reads 8 MB
            shuffle(turn)
            for measure, name in turn:
                values = samples[measure, name]
                assert values is not None
                t0 = time.perf_counter()
                await calls[name](WARM[measure])
                values.append(time.perf_counter() - t0)
    return {k: None if v is None else statistics.median(v) for k, v in samples.items()}


# --- cancels and the first call after a kill, one library at a time ----------------------


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


async def suite(call: Call, kill: Callable[[], Coroutine[Any, Any, Any]]) -> Results:
    out: Results = {}
    await call(targets.noop)
    await anyio.sleep(0.5)  # let a standby worker finish starting, where there is one
    kills = []
    for kind, func in KINDS.items():
        if await timed(call, func) is None:  # the worker has run this kind before the kill
            out[f"first call after a kill, {kind}"] = None
            continue  # the library cannot run it
        kills.append(await cancel_time(kill))
        out[f"first call after a kill, {kind}"] = await timed(call, func)
        await anyio.sleep(0.5)  # the next kill starts from a settled pool
    out["cancel, kill (rung 3)"] = statistics.median(kills)
    return out


async def threadbridge_suite() -> Results:
    async with threadbridge_pool() as call:

        async def kill() -> None:
            await tb.run_killable(targets.sleep_long, backend="process", policy=KILL_NOW)

        out = await suite(call, kill)
    out["cancel, SIGTERM (rung 2)"] = await cancel_time(
        lambda: tb.run_killable(targets.sleep_long, backend="process", policy=SIGTERM_NOW)
    )
    return out


async def anyio_suite() -> Results:
    async with anyio_pool() as call:
        return await suite(call, lambda: call(targets.sleep_long))


async def trio_parallel_suite() -> Results:
    async with trio_parallel_pool() as call:
        return await suite(call, lambda: call(targets.sleep_long))


async def pebble_suite() -> Results:
    import pebble

    pool = pebble.ProcessPool(max_workers=2)
    try:

        async def call(func: Callable[..., object]) -> object:
            return await asyncio.wrap_future(pool.schedule(func))

        told = Path(__import__("tempfile").mkdtemp()) / "pid"

        async def kill() -> None:
            told.unlink(missing_ok=True)
            future = pool.schedule(targets.sleep_long_telling, args=(str(told),))
            try:
                await asyncio.shield(asyncio.wrap_future(future))
            except BaseException:
                # Cancelling the future only marks it; pebble's manager thread stops the
                # worker later. Like the others, this returns once the worker has stopped.
                future.cancel()
                pid = int(told.read_text())  # written well before the cancel
                while targets.running(pid):
                    await asyncio.sleep(0.0002)
                raise

        return await suite(call, kill)
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
import anyio

t0 = time.perf_counter()  # from the library's import: threadbridge's waits for the call
{imports}

def noop():
    return None

async def main():
    {call}
    print(time.perf_counter() - t0)

if __name__ == "__main__":
    {setup}
    anyio.run(main, backend={loop!r})
    {teardown}
"""


def fresh_script(library: str, loop: str, folder: Path) -> float | None:
    imports, setup, teardown = "import anyio.to_process", "", ""
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

LIBRARIES: list[tuple[str, str, Callable[[], Coroutine[Any, Any, Results]]]] = [
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
    # An installed threadbridge is compiled; a checkout run with PYTHONDONTWRITEBYTECODE
    # set is not, and every fresh interpreter (each worker, each fresh script) would
    # compile it anew: 40 ms more on the first call. Compiled here, as pip would.
    compileall.compile_dir(str(Path(tb.__file__).parent), quiet=1)
    n = 200 if args.quick else 1000
    rounds = args.rounds or (2 if args.quick else 5)
    libraries = [entry for entry in LIBRARIES if available(entry[1])]
    samples: dict[tuple[str, str, str], list[float | None]] = {}
    folder = Path(__import__("tempfile").mkdtemp())
    for number in range(1, rounds + 1):
        print(f"round {number} of {rounds}", file=sys.stderr)
        for loop in ("asyncio", "trio"):
            names = [library for on, library, _ in libraries if on == loop]
            warm = anyio.run(side_by_side, names, n, backend=loop)
            for (measure, library), value in warm.items():
                samples.setdefault((measure, loop, library), []).append(value)
        for loop, library, run in libraries:
            results = anyio.run(run, backend=loop)
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
        f"\nmedian of {rounds} interleaved rounds. warm rows: median of {n} calls (8 MB: a tenth),"
        "\nthe libraries of a loop side by side in one event loop, their calls alternating."
        "\ncancel rows: from the cancel to the await returning (threadbridge has reaped the"
        "\nworker by then). 'cannot': the library could not run that target."
    )


if __name__ == "__main__":
    main()
