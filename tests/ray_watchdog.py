"""Stops the test session's Ray cluster, even when the test run dies without its teardown.

Run as ``python ray_watchdog.py SESSION``: it waits for the end of its stdin (the test
run closes it, or dies), then SIGKILLs every process of session ``SESSION``, the one in
which ``ray start`` started the cluster, and waits until they are gone. Ray's processes
are not its children: it finds them by their session. Killing them all at once is what
``ray stop --force`` does, for every cluster of the machine; this stops one.
"""

from __future__ import annotations

import os
import sys
import time

import psutil


def session_members(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid``, zombies aside (init reaps those)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):  # gone meanwhile
            pass
    return found


def stop_session(sid: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while (members := session_members(sid)) and time.monotonic() < end:
        for proc in members:  # again each round: a raylet may start a worker meanwhile
            try:
                proc.kill()
            except psutil.Error:
                pass
        time.sleep(0.05)


if __name__ == "__main__":
    sys.stdin.buffer.read()
    stop_session(int(sys.argv[1]))
