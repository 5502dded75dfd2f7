"""Which worker pools there are: each event loop's default pool (made on first use,
shut down as the loop ends), and every pool, to shut down at exit and to forget in a
forked child."""

from __future__ import annotations

import atexit
import os
import weakref

from . import _stats
from ._loop import Link
from ._worker_pool import WorkerPool


def track(pool: WorkerPool) -> WorkerPool:
    """Count ``pool`` among those shut down at exit and forgotten after a fork."""
    _all_pools.add(pool)
    return pool


_all_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()
_pools: weakref.WeakKeyDictionary[object, WorkerPool] = weakref.WeakKeyDictionary()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_all_pools):
        pool.shutdown()


def _forget_after_fork() -> None:
    """In a forked child: the parent's pools are not ours. Never end them (at exit or
    otherwise), and close our copies of their pipes, so that the parent's workers see end
    of file when the parent dies, whatever its children do."""
    for pool in list(_all_pools):
        for worker in list(pool.workers):
            worker.forget()
        pool.starter.forget()
        _stats.unregister(pool)
    _all_pools.clear()
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def pool_for(link: Link) -> WorkerPool:
    """The default pool of the running loop; made, with its shutdown hook, on first use."""
    key = link.key
    pool = _pools.get(key)
    if pool is None:
        # The pool outlives the call: it keeps the loop's own Link, not a call's.
        link = link.portal or link
        pool = _pools[key] = track(WorkerPool(link))

        def close() -> None:
            # The pool refers to the loop (through its link): dropped from the registry,
            # it no longer keeps the ended loop alive.
            _pools.pop(key, None)
            pool.shutdown()

        link.on_close(close, "threadbridge process pool guard")
    return pool
