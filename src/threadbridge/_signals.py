"""Reading signal state cheaply, in the worker's per-job path and on every write to a worker.

The ``signal`` module's wrappers turn each answer into an enum; for a handler that is a
Python function that costs a raised and caught ValueError, about two microseconds a
call. The C functions under them answer in nanoseconds, with plain ints.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from typing import Any

try:
    import _signal as _c  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - not CPython: the wrappers do the same, slower
    _c = signal


def _no_sigmask(how: int, mask: Iterable[int]) -> set[int]:
    raise NotImplementedError("signal masks are POSIX only")


getsignal: Callable[[int], Any] = _c.getsignal
# Absent on Windows, where nothing that needs it runs: importing this module stays safe.
pthread_sigmask: Callable[[int, Iterable[int]], set[int]] = getattr(
    _c, "pthread_sigmask", _no_sigmask
)
