"""What is running, and where: `kill -USR1 <pid>` logs every running target with its stack.

A service with blocking work in a thread and in a worker process. The handler of SIGUSR1
starts a thread that logs `threadbridge.running()`: `where()` of a process target waits
for the worker's answer, which the event loop reads, so it must not run in the loop's
thread (where a Python signal handler runs).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import anyio

import threadbridge

logger = logging.getLogger("service")


def dump_running() -> None:
    for target in threadbridge.running():
        logger.warning("%r\n%s", target, target.where())


def on_usr1(signum: int, frame: object) -> None:
    threading.Thread(target=dump_running, name="dump-running", daemon=True).start()


def poll_forever(seconds: float) -> None:  # stands for a driver call that never returns
    print("poll_forever started", file=sys.stderr, flush=True)
    while True:
        time.sleep(seconds)


def crunch() -> int:  # stands for pure-Python work that never checks its token
    print("crunch started", file=sys.stderr, flush=True)
    total = 0
    while True:
        total += 1


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    signal.signal(signal.SIGUSR1, on_usr1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: threadbridge.run_killable(poll_forever, 0.5))
        tg.start_soon(lambda: threadbridge.run_killable(crunch, backend="process"))
        print(f"running as {os.getpid()}; kill -USR1 {os.getpid()} to see where", flush=True)
        # Ctrl-C (or SIGTERM, below) cancels the task group: both targets climb the
        # ladder and stop before the program ends.
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                break


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
