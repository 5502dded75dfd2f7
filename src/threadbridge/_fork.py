"""What a forked worker must undo of the threads its parent had.

Only the thread that calls ``os.fork()`` goes on in the child; whatever the parent's
other threads held at that moment stays held, with no thread left to release it.
CPython resets its own interpreter locks (and threadbridge its own, with
``os.register_at_fork``), but not the per-module locks of imports that other threads
were in the middle of: the child would wait for ever on the first import of such a
module. threadbridge's own threads import lazily too (the loop thread loads tblib for an
answer's traceback), so this can happen in a program that starts no thread of its own.
"""

from __future__ import annotations

import sys
import threading


def release_imports_of_lost_threads() -> None:
    """In a fork's child: forget the import locks that threads which did not survive the
    fork held, and the half-imported modules behind them, so that the child imports
    those modules afresh. Relies on importlib's private module-lock table (the same
    shape from Python 3.10 to 3.14); where that is missing, does nothing."""
    try:
        from importlib import _bootstrap
    except ImportError:  # pragma: no cover - an interpreter without importlib's bootstrap
        return
    locks = getattr(_bootstrap, "_module_locks", None)
    if not isinstance(locks, dict):  # pragma: no cover - a future importlib
        return
    me = threading.get_ident()
    for name, ref in list(locks.items()):
        try:
            lock = ref()
        except TypeError:  # pragma: no cover - not a weak reference after all
            continue
        owner = getattr(lock, "owner", None)
        if owner is None or owner == me:
            continue  # free, or held by this very thread (an import it is inside of)
        del locks[name]  # the next import of it makes a new lock
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        if module is not None and getattr(spec, "_initializing", False):
            del sys.modules[name]  # its import stopped half-way here: start it again
    # Which lock each thread waits on, for importlib's deadlock detection: a new thread
    # here may be given the id of one that is gone, and must not inherit its waits.
    blocking = getattr(_bootstrap, "_blocking_on", None)
    table = getattr(blocking, "data", blocking)  # a plain dict before Python 3.12
    if isinstance(table, dict):
        for ident in [ident for ident in table if ident != me]:
            del table[ident]
