"""What a forked worker must undo of the threads its parent had.

Only the thread that calls ``os.fork()`` goes on in the child; whatever the parent's
other threads held at that moment stays held, with no thread left to release it.
CPython resets its own interpreter locks (and threadbridge its own, with
``os.register_at_fork``), but not the per-module locks of imports that other threads
were in the middle of: the child would wait for ever on the first import of such a
module. threadbridge's own threads import lazily too (the loop thread loads tblib for an
answer's traceback), so this can happen in a program that starts no thread of its own.

The child also inherits what the parent had written to ``sys.stdout`` and ``sys.stderr``
but not yet flushed: written out again by the child, it would appear twice.
"""

from __future__ import annotations

import io
import sys
import threading

# The streams a forked child inherited: kept alive, never flushed nor finalized (the child
# leaves with os._exit()), so the parent's unflushed output in them is never written twice.
_inherited: list[object] = []


def forget_inherited_output() -> None:
    """In a fork's child: put fresh ``sys.stdout`` and ``sys.stderr`` on the same files in
    place of the parent's, whose buffers may hold output the parent has not flushed yet
    (the parent writes it itself). What the child writes goes through the fresh ones."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if getattr(stream, "write_through", False) and isinstance(
            getattr(stream, "buffer", None), io.FileIO
        ):
            continue  # unbuffered (python -u): it holds nothing
        try:
            binary = io.BufferedWriter(io.FileIO(stream.fileno(), "w", closefd=False))
            fresh = io.TextIOWrapper(
                binary,
                encoding=stream.encoding,
                errors=stream.errors,
                line_buffering=stream.line_buffering,
                write_through=getattr(stream, "write_through", False),
            )
        except (AttributeError, OSError, ValueError, TypeError, LookupError):
            continue  # not a file (an in-memory capture): nothing of it reaches a file
        _inherited.append(stream)
        setattr(sys, name, fresh)
        if getattr(sys, f"__{name}__") is stream:
            setattr(sys, f"__{name}__", fresh)


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
