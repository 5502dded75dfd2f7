"""How a closing pool ends its workers."""

from __future__ import annotations

import signal
import subprocess
import time

from ._worker_process import WorkerProcess

# When a pool closes, its idle workers get this long to exit on their own before SIGKILL.
SHUTDOWN_GRACE = 1.0


def end_workers(workers: list[WorkerProcess], *, loop_gone: bool = False) -> None:
    """The pool is closing, and the loop reads no more answers. A busy worker's call
    climbs its own ladder (its Policy's graces, rung 2 and rung 3 or none), and the worker
    is asked to exit once it has answered; idle workers are asked at once and killed after
    SHUTDOWN_GRACE. Each run then reports how it really ended: with ``force=False`` this
    waits until its target ends by itself."""
    busy = set()
    for worker in workers:
        work = worker.current
        if work is not None:
            work.run.cancel()  # its ladder, on its own clock
            busy.add(worker)
        worker.ask_to_exit()  # a busy one reads it once it has answered
    deadline = time.monotonic() + SHUTDOWN_GRACE
    for worker in workers:
        if worker in busy:
            # It exits once it has answered, or its ladder kills it at rung 3: then the
            # kill's own finish() reaps it (within its bound) and reports.
            while not worker.finished:
                try:
                    worker.proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
        else:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.signal_group(signal.SIGKILL)
        worker.finish(drain=True, loop_gone=loop_gone)
        if worker in busy:
            # Its call is reported before the pool (and the loop) is done, whichever
            # thread finishes the worker.
            worker.ended.wait()
