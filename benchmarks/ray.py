"""Ray backend benchmark: threadbridge's ladder against plain Ray.

Run by hand (needs the "ray" extra; starts a local cluster of 2 CPUs):

    python benchmarks/ray.py            # about a minute
    python benchmarks/ray.py --quick

Measures:

* per-call overhead: a no-op task awaited plainly (``await ref`` on asyncio; on trio,
  ``ray.get`` in a thread, since trio cannot await a Ray ref) against ``run_killable``;
* cancel -> remote work stopped, for a target that checks its token, a pure-Python loop
  and a ``time.sleep``: threadbridge's ladder (a cancel scope; stopped when the target's
  ``finally`` ran or its worker is gone) against ``ray.cancel(ref)`` and
  ``ray.cancel(ref, force=True)``. "not stopped" means the work still ran 10 s later.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import trio

# This script is named ray.py: its own folder must not shadow Ray itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
ray: Any = __import__("ray")
sys.path.append(_HERE)
from _table import print_table  # noqa: E402 - after the path fix above

import threadbridge as tb  # noqa: E402

GIVE_UP = 10.0  # seconds after the cancel: the work has not stopped


def noop() -> None:
    return None


def cooperative(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    try:
        while True:
            tb.check_cancelled()
            time.sleep(0.001)
    finally:
        Path(path + ".stopped").touch()


def spin(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    try:
        while True:
            pass
    finally:
        Path(path + ".stopped").touch()


def sleeps(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    try:
        time.sleep(3600)
    finally:
        Path(path + ".stopped").touch()


TARGETS: dict[str, Callable[[str], None]] = {
    "checks its token": cooperative,
    "pure-Python loop": spin,
    "time.sleep": sleeps,
}


def stopped(path: str) -> bool:
    if os.path.exists(path + ".stopped"):
        return True
    try:
        os.kill(int(Path(path).read_text()), 0)
    except ProcessLookupError:
        return True
    return False


async def wait_started(path: str) -> None:
    while not (os.path.exists(path) and Path(path).read_text()):
        await anyio.sleep(0.002)


async def until_stopped(path: str, t0: float) -> float | None:
    while not stopped(path):
        if time.perf_counter() - t0 > GIVE_UP:
            return None
        await anyio.sleep(0.001)
    return time.perf_counter() - t0


async def overhead(n: int, loop: str) -> dict[str, float]:
    plain_remote = ray.remote(noop)
    out: dict[str, float] = {}

    async def plain() -> None:
        if loop == "asyncio":
            await plain_remote.remote()
        else:
            await trio.to_thread.run_sync(ray.get, plain_remote.remote())

    async def ours() -> None:
        await tb.run_killable(noop, backend="ray")

    for name, call in (("plain", plain), ("threadbridge", ours)):
        for _ in range(10):
            await call()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - t0)
        out[name] = statistics.median(samples)
    return out


async def cancel_ladder(target: Callable[[str], None], folder: str) -> float | None:
    path = tempfile.mktemp(dir=folder)
    policy = tb.Policy(grace=0.05, interrupt_grace=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: tb.run_killable(target, path, backend="ray", policy=policy))
        await wait_started(path)
        t0 = time.perf_counter()
        tg.cancel_scope.cancel()
    return await until_stopped(path, t0)


async def cancel_plain(target: Callable[[str], None], folder: str, force: bool) -> float | None:
    path = tempfile.mktemp(dir=folder)
    ref = ray.remote(max_retries=0)(target).remote(path)
    await wait_started(path)
    t0 = time.perf_counter()
    ray.cancel(ref, force=force)
    result = await until_stopped(path, t0)
    if result is None:
        ray.cancel(ref, force=True)  # clean up for the next measure
        while not stopped(path):
            await anyio.sleep(0.01)
    return result


def ms(value: float | None) -> str:
    return "not stopped" if value is None else f"{value * 1000:.1f} ms"


def main() -> None:
    logging.getLogger("threadbridge").setLevel(logging.ERROR)  # rung 3 is expected here
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 50 if args.quick else 200
    repeats = 2 if args.quick else 5
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for loop in ("asyncio", "trio"):
        results = anyio.run(overhead, n, loop, backend=loop)
        baseline = "await ref" if loop == "asyncio" else "ray.get in a thread"
        rows.append(("no-op call", loop, baseline, ms(results["plain"])))
        rows.append(("no-op call", loop, "run_killable", ms(results["threadbridge"])))
    folder = tempfile.mkdtemp()

    async def cancels() -> None:
        for what, target in TARGETS.items():
            ladder = [await cancel_ladder(target, folder) for _ in range(repeats)]
            soft = [await cancel_plain(target, folder, False) for _ in range(repeats)]
            hard = [await cancel_plain(target, folder, True) for _ in range(repeats)]
            for name, values in (
                ("threadbridge ladder", ladder),
                ("ray.cancel(ref)", soft),
                ("ray.cancel(ref, force=True)", hard),
            ):
                known = [v for v in values if v is not None]
                value = statistics.median(known) if len(known) == len(values) else None
                rows.append((f"cancel -> stopped, {what}", "asyncio", name, ms(value)))

    anyio.run(cancels, backend="asyncio")
    ray.shutdown()
    print_table(("measure", "loop", "how", "time"), rows)
    print(
        f"\nno-op: median of {n} sequential calls. cancel rows: median of {repeats}, from the"
        "\ncancel to the target's finally block having run or its worker being gone."
        "\nthreadbridge's Policy here: grace=0.05 s, interrupt_grace=0.5 s."
    )


if __name__ == "__main__":
    main()
