from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from threadbridge._stats import COUNTERS

pytest_plugins = ["anyio"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def _fd_count() -> int:
    if os.path.isdir("/proc/self/fd"):
        return len(os.listdir("/proc/self/fd"))
    return 0  # pragma: no cover - elsewhere only threads and targets are checked


# Thread pools that keep idle threads for a while by design: threadbridge's own, trio's
# thread cache, anyio's and asyncio's default executors. A thread of theirs outliving a
# test is reuse, not a leak; threadbridge's busy and abandoned threads are checked through
# its counters instead.
_POOLS = (
    "threadbridge-worker",
    "threadbridge-ladder",
    "Trio thread",
    "AnyIO worker thread",
    "asyncio_",
)


def _pooled(thread: threading.Thread) -> bool:
    return thread.name.startswith(_POOLS)


def _children_left(timeout: float) -> list[str]:
    """Children (and zombies) of this process still there after ``timeout`` seconds."""
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        left = me.children(recursive=True)
        if not left or time.monotonic() > deadline:
            break
        psutil.wait_procs(left, timeout=max(0.0, deadline - time.monotonic()))
    described = []
    for proc in left:
        try:
            described.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            continue
    return described


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if a target still runs, or a thread, child process, zombie or fd
    outlives it."""
    before_threads = set(threading.enumerate())
    before_fds = _fd_count()
    yield
    if not COUNTERS.wait_quiet(timeout=10):
        snapshot = COUNTERS.snapshot()
        pytest.fail(f"targets still running 10 s after the test ended: {snapshot}")
    strays = [t for t in threading.enumerate() if t not in before_threads and not _pooled(t)]
    for thread in strays:
        thread.join(timeout=5)
    alive = [t.name for t in strays if t.is_alive()]
    assert not alive, f"threads left running by the test: {alive}"
    children = _children_left(timeout=10)
    assert not children, f"child processes left by the test: {children}"
    after_fds = _fd_count()
    assert after_fds <= before_fds, f"file descriptors leaked: {before_fds} -> {after_fds}"
