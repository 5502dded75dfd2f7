"""Targets for benchmarks/processes.py, importable by every library's workers."""

from __future__ import annotations

import os
import time
from typing import Any


def noop() -> None:
    return None


def sleep_long() -> None:
    time.sleep(60)


def sleep_long_telling(path: str) -> None:
    """Sleep, having written this worker's pid to ``path``."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)


def running(pid: int) -> bool:
    """Whether the process still runs (a zombie has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def floor_child(conn: Any) -> None:
    """benchmarks/hops.py's process floor: run each pickled ``(function, args)`` the pipe
    brings, and send back the pickled outcome; an empty message ends it."""
    import pickle

    while True:
        message = conn.recv_bytes()
        if not message:
            return
        func, args = pickle.loads(message)
        try:
            outcome = (True, func(*args))
        except BaseException as exc:
            outcome = (False, exc)
        conn.send_bytes(pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL))
