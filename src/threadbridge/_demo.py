"""The demo behind ``python -m threadbridge demo``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from ._api import spawn
from ._errors import TargetCancelled
from ._policy import Policy, Stage
from ._token import cancel_requested

POLICY = Policy(grace=0.2, interrupt_grace=0.3)  # the default; see main()

RUNG = {
    Stage.FINISHED: "-",
    Stage.COOPERATIVE: "1 cooperative",
    Stage.INTERRUPTED: "2 interrupt",
    Stage.ABANDONED: "3 abandon",
    Stage.KILLED: "3 kill",
}


@dataclass
class Target:
    title: str
    func: Callable[[list[str]], None]


def checks_token(log: list[str]) -> None:
    try:
        while not cancel_requested():
            sum(range(1000))
    finally:
        log.append("finally ran")


def _crunch() -> None:
    x = 0
    while True:
        x += 1


def pure_python_loop(log: list[str]) -> None:
    try:
        _crunch()
    finally:
        log.append("finally ran")


def blocked_in_sleep(log: list[str]) -> None:
    try:
        time.sleep(5)
    finally:
        log.append("finally ran")


def swallows_cancel(log: list[str]) -> None:
    try:
        _crunch()
    except TargetCancelled:
        log.append("swallowed TargetCancelled")
    time.sleep(5)  # and carries on with something long


TARGETS = [
    Target("checks its token", checks_token),
    Target("pure-Python loop, never checks", pure_python_loop),
    Target("blocked in time.sleep(5)", blocked_in_sleep),
    Target("swallows TargetCancelled", swallows_cancel),
]


# Process targets report through a file: what happens in the worker after a cancel
# never comes back as a result.
def sleeps_in_worker(marker: str) -> None:
    with open(marker, "a") as f:
        f.write("started;\n")
    try:
        time.sleep(30)
    finally:
        with open(marker, "a") as f:
            f.write("finally ran\n")


def ignores_sigterm_in_worker(marker: str) -> None:
    import os
    import signal
    import subprocess
    import sys

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(marker, "a") as f:
        f.write(f"{os.getpid()} {child.pid}\n")
    time.sleep(60)


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # pragma: no cover - no /proc: ask the kernel instead
        import os

        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


@dataclass
class Row:
    loop: str
    target: str
    rung: str
    stage: str
    ms: float
    note: str


async def _run_one(loop_name: str, target: Target, policy: Policy) -> Row:
    log: list[str] = []
    started = threading.Event()

    def body() -> None:
        started.set()
        target.func(log)

    handle = spawn(body, policy=policy)
    # A target stopped before it starts never runs: let this one get going first.
    await anyio.to_thread.run_sync(started.wait)
    t0 = time.perf_counter()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await handle
    ms = (time.perf_counter() - t0) * 1000
    note = ", ".join(log) if log else ""
    if handle.stage is Stage.ABANDONED:
        note = (note + "; " if note else "") + "thread left running as a daemon"
    return Row(loop_name, target.title, RUNG[handle.stage], handle.stage.name, ms, note)


async def _run_process(
    loop_name: str, title: str, func: Callable[[str], None], policy: Policy
) -> Row:
    import os
    import tempfile

    fd, marker = tempfile.mkstemp(prefix="threadbridge-demo-")
    os.close(fd)
    try:
        handle = spawn(func, marker, backend="process", policy=policy)
        with anyio.fail_after(30):  # the first call starts a worker process
            while not Path(marker).read_text():
                await anyio.sleep(0.01)
        t0 = time.perf_counter()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await handle
        ms = (time.perf_counter() - t0) * 1000
        text = Path(marker).read_text().split()
        if func is ignores_sigterm_in_worker:
            worker, grandchild = (int(x) for x in text[:2])
            with anyio.fail_after(5):
                while not _gone(grandchild):
                    await anyio.sleep(0.01)
            note = f"SIGTERM ignored; worker {worker} and its child {grandchild} killed, reaped"
        else:
            note = " ".join(w for w in text if w != "started;") + " in the worker"
    finally:
        os.unlink(marker)
    return Row(loop_name, title, RUNG[handle.stage], handle.stage.name, ms, note)


async def _run_all(loop_name: str, rows: list[Row], processes: bool, policy: Policy) -> None:
    for target in TARGETS:
        rows.append(await _run_one(loop_name, target, policy))
    if processes:
        where = f"{loop_name}/proc"
        rows.append(
            await _run_process(where, "time.sleep(30) in a worker", sleeps_in_worker, policy)
        )
        rows.append(
            await _run_process(
                where, "ignores SIGTERM, has a child", ignores_sigterm_in_worker, policy
            )
        )


def _table(rows: list[Row]) -> str:
    headers = ("loop", "target", "stopped at rung", "stage", "cancel -> return", "what happened")
    cells = [(r.loop, r.target, r.rung, r.stage, f"{r.ms:7.1f} ms", r.note) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def join(values: tuple[str, ...]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [join(headers), join(tuple("-" * w for w in widths))]
    out += [join(row) for row in cells]
    return "\n".join(out)


def demo(policy: Policy = POLICY) -> int:
    # The ladder logs rungs 2 and 3; the table below says the same thing more readably.
    logging.getLogger("threadbridge").setLevel(logging.CRITICAL)
    print("threadbridge demo: each target is started with spawn(), then its await is")
    print(
        f"cancelled. Policy: grace={policy.grace}s before rung 2, "
        f"interrupt_grace={policy.interrupt_grace}s before rung 3.\n"
    )
    rows: list[Row] = []
    backends = ["asyncio"]
    if importlib.util.find_spec("trio") is not None:
        backends.append("trio")
    from ._process_backend import available

    processes = available()
    for backend in backends:
        anyio.run(_run_all, backend, rows, processes, policy, backend=backend)
    print(_table(rows))
    if not processes:
        print("\n(this platform has no process groups or POSIX signals: no worker processes)")
    if "trio" not in backends:
        print("\n(trio is not installed: pip install 'threadbridge[trio]' to see it too)")
    print(
        "\nRung 1 sets the target's token; rung 2 raises TargetCancelled inside the thread"
        "\n(it cannot land inside a blocking C call such as time.sleep) or sends SIGTERM to"
        "\nthe worker process, which interrupts even time.sleep; rung 3 abandons the thread"
        "\nor SIGKILLs the worker's whole process group. The cancelled await returns only"
        "\nafter the work has stopped, been killed and reaped, or been given up on."
    )
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m threadbridge")
    sub = parser.add_subparsers(dest="command", required=True)
    shown = sub.add_parser("demo", help="show the escalation ladder stopping blocking work")
    for flag, default, meaning in (
        ("--grace", POLICY.grace, "how long each target has to stop at its token before rung 2"),
        ("--interrupt-grace", POLICY.interrupt_grace, "how long rung 2 has before rung 3"),
    ):
        shown.add_argument(
            flag, type=float, default=default, metavar="SECONDS", help=f"{meaning} ({default})"
        )
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            policy = Policy(grace=args.grace, interrupt_grace=args.interrupt_grace)
        except (TypeError, ValueError) as exc:
            parser.error(str(exc))
        return demo(policy)
    return 2  # pragma: no cover - argparse has refused anything else
