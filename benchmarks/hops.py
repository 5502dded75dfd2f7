"""Every hop of a warm call against its floor and its peers, on both loops.

Run by hand (needs the "bench" extra for trio-parallel and pebble):

    python benchmarks/hops.py                 # 9 rounds, a few minutes
    python benchmarks/hops.py --quick         # 3 rounds
    python benchmarks/hops.py --load 2        # with 2 busy processes running meanwhile

A hop is where the target runs (a thread or a worker process) seen from an event loop
(asyncio or trio). Each hop is measured for threadbridge, for the peers that have it, and
for its *floor*: the least any library can do for the same work.

* thread floor: one persistent thread fed by a ``SimpleQueue``; it hands the result back
  with the loop's own thread-safe call (``loop.call_soon_threadsafe``,
  ``TrioToken.run_sync_soon``);
* process floor: one persistent child fed the pickled ``(function, args)`` over a pipe
  (cloudpickle for what plain pickle cannot carry: a lambda), the pickled result read
  back when the loop says the pipe is readable.

Targets as users write them: a function of an importable module, a function of this
script (``__main__``) and a lambda. The peers that cannot run a target are left out of
its row (no peer runs a lambda in a process: compare with the floor there).

Latency: in every round, each placement, target and contender is timed over a block of
calls in a row, the contenders of a hop open side by side in one event loop and timed
in a new random order for each target. Placements: as the scheduler places the threads
and processes, and (Linux) pinned: the loop's thread on one CPU and everything else on
the same CPU ("one CPU") or on another ("two CPUs"). Unpinned, a call's two sides meet
on one CPU or on two, and which one the scheduler picks, for seconds at a time, decides
the figure more than the code does (waking an idle CPU of a VM costs tens of µs); pinned,
each case is measured by itself. The table gives per contender the median of the rounds
and their middle half (quartiles), and threadbridge's ratios to the floor and to the best
peer (the peer with the lowest median), each the median of the per-round ratios.

Throughput: calls per second with 40 concurrent callers, each contender in turn, in a new
random order per round, unpinned (floors are one thread or one process: left out).

Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import compileall
import multiprocessing
import os
import pickle
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_process
import anyio.to_thread
import trio

sys.path.insert(0, str(Path(__file__).parent))
import _proc_targets as targets
from _table import print_table
from processes import pebble_pool, trio_parallel_pool

import threadbridge as tb

Call = Callable[[Callable[[], object]], Awaitable[object]]


def noop_main() -> None:
    return None


KINDS: dict[str, Callable[[], object]] = {
    "module": targets.noop,
    "__main__": noop_main,
    "lambda": lambda: None,
}

# --- floors ----------------------------------------------------------------------------------


def _thread_floor_main(jobs: queue.SimpleQueue[Any]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        func, hand_back = job
        try:
            hand_back(True, func())
        except BaseException as exc:
            hand_back(False, exc)


@asynccontextmanager
async def thread_floor(loop_name: str) -> AsyncIterator[Call]:
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    worker = threading.Thread(target=_thread_floor_main, args=(jobs,), daemon=True)
    worker.start()
    try:
        if loop_name == "asyncio":
            loop = asyncio.get_running_loop()

            def settle(future: asyncio.Future[object], ok: bool, value: Any) -> None:
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

            async def call(func: Callable[[], object]) -> object:
                future = loop.create_future()
                jobs.put(
                    (func, lambda ok, value: loop.call_soon_threadsafe(settle, future, ok, value))
                )
                return await future

        else:
            token = trio.lowlevel.current_trio_token()
            reschedule = trio.lowlevel.reschedule
            import outcome

            async def call(func: Callable[[], object]) -> object:
                task = trio.lowlevel.current_task()

                def hand_back(ok: bool, value: Any) -> None:
                    result = outcome.Value(value) if ok else outcome.Error(value)
                    token.run_sync_soon(reschedule, task, result)

                jobs.put((func, hand_back))
                return await trio.lowlevel.wait_task_rescheduled(
                    lambda _: trio.lowlevel.Abort.FAILED
                )

        yield call
    finally:
        jobs.put(None)
        worker.join()


def _dumps(item: object) -> bytes:
    try:
        return pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError):
        import cloudpickle

        return cloudpickle.dumps(item, pickle.HIGHEST_PROTOCOL)


@asynccontextmanager
async def process_floor(loop_name: str) -> AsyncIterator[Call]:
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=targets.floor_child, args=(theirs,), daemon=True
    )
    child.start()
    theirs.close()
    fd = ours.fileno()
    try:
        if loop_name == "asyncio":
            loop = asyncio.get_running_loop()
            waiting: collections.deque[asyncio.Future[object]] = collections.deque()

            def readable() -> None:
                ok, value = pickle.loads(ours.recv_bytes())
                future = waiting.popleft()
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

            loop.add_reader(fd, readable)

            async def call(func: Callable[[], object]) -> object:
                future = loop.create_future()
                waiting.append(future)
                ours.send_bytes(_dumps((func, ())))
                return await future

            try:
                yield call
            finally:
                loop.remove_reader(fd)
        else:
            lock = trio.Lock()  # one call at a time on the pipe

            async def call(func: Callable[[], object]) -> object:
                async with lock:
                    ours.send_bytes(_dumps((func, ())))
                    await trio.lowlevel.wait_readable(fd)
                    ok, value = pickle.loads(ours.recv_bytes())
                if not ok:
                    raise value
                return value

            yield call
    finally:
        ours.send_bytes(b"")
        child.join(10)
        ours.close()


# --- the contenders ----------------------------------------------------------------------


@asynccontextmanager
async def plain(call: Call) -> AsyncIterator[Call]:
    yield call


Opener = Callable[[], Any]
FLOOR = "floor"
HOPS = ["thread", "process"]
# The CPUs this program may use, read once: pinning the main thread changes what
# sched_getaffinity(0) says.
ALL_CPUS = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def contenders(hop: str, loop: str) -> dict[str, Opener]:
    """Each contender of ``hop`` on ``loop``: its name, and what opens it."""
    if hop == "thread":
        found: dict[str, Opener] = {
            "threadbridge": lambda: plain(tb.run_killable),
            "anyio.to_thread": lambda: plain(anyio.to_thread.run_sync),
        }
        if loop == "asyncio":
            found["asyncio.to_thread"] = lambda: plain(asyncio.to_thread)
        else:
            found["trio.to_thread"] = lambda: plain(trio.to_thread.run_sync)
        found[FLOOR] = lambda: thread_floor(loop)
        return found
    found = {
        "threadbridge": lambda: plain(lambda f: tb.run_killable(f, backend="process")),
        "anyio.to_process": lambda: plain(lambda f: anyio.to_process.run_sync(f, cancellable=True)),
    }
    if loop == "trio" and _installed("trio_parallel"):
        found["trio-parallel"] = trio_parallel_pool
    if loop == "asyncio" and _installed("pebble"):
        found["pebble"] = pebble_pool
    found[FLOOR] = lambda: process_floor(loop)
    return found


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        print(f"({module} is not installed: pip install -e '.[bench]')", file=sys.stderr)
        return False
    return True


# --- one round ---------------------------------------------------------------------------

Key = tuple[str, ...]  # hop, loop, (placement,) contender, target kind


async def latency_round(loop: str, hop: str, n: int, out: dict[Key, list[float]]) -> None:
    """One round of a hop's warm calls on this loop: every placement, target and
    contender, a block of ``n`` calls each."""
    async with AsyncExitStack() as stack:
        calls: dict[str, Call] = {}
        for name, opener in contenders(hop, loop).items():
            calls[name] = await stack.enter_async_context(opener())
        able: dict[str, list[str]] = {}
        for kind, func in KINDS.items():
            able[kind] = []
            for name, call in calls.items():
                try:
                    for _ in range(20):  # warm: every worker started, every import done
                        await call(func)
                except Exception:
                    continue  # this contender cannot run this target
                able[kind].append(name)
        await anyio.sleep(0.3)  # a standby worker, where there is one, finishes starting
        clock = time.perf_counter
        for where, pin in placements().items():
            for kind, names in able.items():
                func = KINDS[kind]
                for name in random.sample(names, len(names)):
                    call = calls[name]
                    pin()  # again: a pool may have started a thread or a worker since
                    for _ in range(5):
                        await call(func)
                    t0 = clock()
                    for _ in range(n):
                        await call(func)
                    out.setdefault((hop, loop, where, name, kind), []).append((clock() - t0) / n)
        placements()["as scheduled"]()


def _threads_and_children() -> tuple[list[int], list[int]]:
    """This process's threads other than the main one, and every thread of its
    descendant processes (Linux: read from /proc)."""
    main = threading.main_thread().native_id
    ours = [int(t) for t in os.listdir("/proc/self/task") if int(t) != main]
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    theirs: list[int] = []
    todo = list(parents.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo.extend(parents.get(pid, []))
        try:
            theirs.extend(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return ours, theirs


def placements() -> dict[str, Callable[[], None]]:
    """Where each placement puts the loop's thread and everything else (see above)."""
    if not ALL_CPUS or not os.path.isdir("/proc/self/task"):
        return {"as scheduled": lambda: None}
    everywhere = ALL_CPUS

    def pin(loop_cpus: set[int], other_cpus: set[int]) -> None:
        os.sched_setaffinity(threading.main_thread().native_id or 0, loop_cpus)
        ours, theirs = _threads_and_children()
        for tid in ours + theirs:
            try:
                os.sched_setaffinity(tid, other_cpus)
            except OSError:
                pass  # ended meanwhile

    chosen = {"as scheduled": lambda: pin(everywhere, everywhere)}
    if len(everywhere) >= 2:
        first, second = sorted(everywhere)[:2]
        chosen["one CPU"] = lambda: pin({first}, {first})
        chosen["two CPUs"] = lambda: pin({first}, {second})
    return chosen


async def throughput_round(loop: str, n: int, out: dict[Key, list[float]]) -> None:
    """Calls per second with 40 concurrent callers; the contenders in a random order."""
    entries = [
        (hop, name, opener)
        for hop in ("thread", "process")
        for name, opener in contenders(hop, loop).items()
        if name != FLOOR
    ]
    random.shuffle(entries)
    for hop, name, opener in entries:
        async with opener() as call:
            for _ in range(40):
                await call(targets.noop)

            async def caller(k: int, call: Call = call) -> None:
                for _ in range(k):
                    await call(targets.noop)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(caller, n // 40)
            rate = (n // 40 * 40) / (time.perf_counter() - t0)
        out.setdefault((hop, loop, name), []).append(rate)


# --- the run -------------------------------------------------------------------------------


def busy(seconds: float) -> None:  # pragma: no cover - a load process
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of fewer calls")
    parser.add_argument("--rounds", type=int, help="rounds (9; --quick: 3)")
    parser.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    args = parser.parse_args()
    # As pip would: a checkout run with PYTHONDONTWRITEBYTECODE would compile threadbridge
    # anew in every worker.
    compileall.compile_dir(str(Path(tb.__file__).parent), quiet=1)
    rounds = args.rounds or (3 if args.quick else 9)
    n, many = (200, 800) if args.quick else (500, 2000)
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    latency: dict[Key, list[float]] = {}
    rates: dict[Key, list[float]] = {}
    try:
        for number in range(1, rounds + 1):
            print(f"round {number} of {rounds}", file=sys.stderr)
            loops = ["asyncio", "trio"]
            random.shuffle(loops)
            for loop in loops:
                for hop in random.sample(HOPS, len(HOPS)):
                    anyio.run(latency_round, loop, hop, n, latency, backend=loop)
                anyio.run(throughput_round, loop, many, rates, backend=loop)
    finally:
        for process in load:
            process.kill()
            process.wait()
    report(latency, rates, rounds, args.load)


def report(
    latency: dict[Key, list[float]], rates: dict[Key, list[float]], rounds: int, load: int
) -> None:
    rows = []
    groups = sorted({key[:3] + key[4:] for key in latency}, key=_group_order)
    for hop, loop, where, kind in groups:
        here = {
            key[3]: values
            for key, values in latency.items()
            if key[:3] + key[4:] == (hop, loop, where, kind)
        }
        if "threadbridge" not in here:
            continue
        peers = [name for name in here if name not in ("threadbridge", FLOOR)]
        best = min(peers, key=lambda name: statistics.median(here[name])) if peers else None
        for name, values in sorted(here.items(), key=lambda item: statistics.median(item[1])):
            low, _, high = (
                statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
            )
            ratios = ["", ""]
            if name == "threadbridge":
                for i, other in enumerate((FLOOR, best)):
                    if other in here:
                        each = [a / b for a, b in zip(values, here[other], strict=True)]
                        ratios[i] = f"{statistics.median(each):.2f}"
                        if other == best:
                            ratios[i] += f" ({best})"
            rows.append(
                (
                    f"{hop}, {loop}",
                    where,
                    kind,
                    name,
                    f"{statistics.median(values) * 1e6:.0f} µs",
                    f"{low * 1e6:.0f}-{high * 1e6:.0f}",
                    *ratios,
                )
            )
    print(
        f"Warm call latency: median of {rounds} rounds, middle half of the rounds"
        + (f"; {load} busy processes meanwhile" if load else "")
    )
    headers = (
        "hop",
        "placement",
        "target",
        "contender",
        "median",
        "middle half",
        "/ floor",
        "/ best peer",
    )
    print_table(headers, rows)
    rows = []
    for (hop, loop, name), values in sorted(rates.items()):
        low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        rows.append(
            (f"{hop}, {loop}", name, f"{statistics.median(values):,.0f}", f"{low:,.0f}-{high:,.0f}")
        )
    print(
        f"\nThroughput, a module no-op, 40 concurrent callers, unpinned: calls/s, {rounds} rounds"
    )
    print_table(("hop", "contender", "calls/s", "middle half"), rows)


def _group_order(group: tuple[str, ...]) -> tuple[int, ...]:
    hop, loop, where, kind = group
    places = ["as scheduled", "one CPU", "two CPUs"]
    return (
        HOPS.index(hop),
        ["asyncio", "trio"].index(loop),
        places.index(where),
        list(KINDS).index(kind),
    )


if __name__ == "__main__":
    main()
