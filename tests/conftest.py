from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from threadbridge import _call, _internal, _stats

from .helpers import join_soon_started

if TYPE_CHECKING:
    from .tracing import Spans

pytest_plugins = ["anyio", "pytester"]


@pytest.fixture
def spans() -> Iterator[Spans]:
    """A tracer provider for this test only, its finished spans kept in memory."""
    from . import tracing

    yield from tracing.spans()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def _warm_uvloop() -> None:
    """libuv opens a pipe of its own, for good, the first time a uvloop loop runs: opened
    here, it is not the first uvloop test's leak."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return
    import anyio

    async def nothing() -> None:
        pass

    anyio.run(nothing, backend="asyncio", backend_options={"use_uvloop": True})


_warm_uvloop()


def _fd_count(sockets: bool = True) -> int:
    if not os.path.isdir("/proc/self/fd"):
        return 0  # pragma: no cover - elsewhere only threads and targets are checked
    names = os.listdir("/proc/self/fd")
    if sockets:
        return len(names)
    count = 0
    for name in names:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
    return count


# Thread pools that keep idle threads for a while by design: threadbridge's own, trio's
# thread cache, anyio's and asyncio's default executors. A thread of theirs outliving a
# test is reuse, not a leak; threadbridge's busy and abandoned threads are checked through
# its counters instead.
_POOLS = (
    "threadbridge-worker",
    "threadbridge-ladder",
    "threadbridge-redeliver",
    "Trio thread",
    "AnyIO worker thread",
    "asyncio_",
)


def _pooled(thread: threading.Thread) -> bool:
    return thread.name.startswith(_POOLS)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if a thread or a file descriptor outlives it, or if threadbridge
    recorded a violation of its internal contract (a run reported twice, a limiter token
    given back that was not held) while it ran.

    Targets still running, child processes and zombies are checked by threadbridge's own
    pytest plugin (``threadbridge_leak_check = true`` in pyproject.toml), after this.
    """
    before_threads = set(threading.enumerate())
    # Ray's driver opens and keeps connections to the workers it leases: its sockets are
    # its own pool, not descriptors threadbridge left behind (pipes and files still count).
    sockets = request.node.get_closest_marker("foreign_sockets") is None
    before_fds = _fd_count(sockets)
    violations = len(_internal.violations)
    yield
    assert _internal.violations[violations:] == [], "threadbridge broke its internal contract"
    # call()'s engines keep a loop and idle workers between calls, on purpose: closed
    # here, so that what they keep is not counted as the test's.
    _call.close_engines()
    _stats.wait_quiet(timeout=10)  # the plugin reports what is still running
    strays = [t for t in threading.enumerate() if t not in before_threads and not _pooled(t)]
    deadline = time.monotonic() + 5
    for thread in strays:
        join_soon_started(thread, max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in strays if t.is_alive() or t.ident is None]
    assert not alive, f"threads left running by the test: {alive}"
    after_fds = _fd_count(sockets)
    assert after_fds <= before_fds, f"file descriptors leaked: {before_fds} -> {after_fds}"
