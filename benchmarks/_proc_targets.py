"""Targets for benchmarks/processes.py, importable by every library's workers."""

from __future__ import annotations

import time


def noop() -> None:
    return None


def sleep_long() -> None:
    time.sleep(60)
