"""The command line of a new Python interpreter that boots into threadbridge: a spawned
worker, or a fork server."""

from __future__ import annotations

import os
import subprocess
import sys

# The folder threadbridge was imported from. A program may have found it on a path of its
# own making (vendored, embedded, sys.path changed at run time), which a new interpreter
# does not have until the parent's sys.path reaches it.
_HOME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot_path() -> list[str]:
    """The import path a new worker (or fork server) boots with: threadbridge's own folder
    first, then the parent's path, so that threadbridge and what it imports (cloudpickle,
    tblib) come from where the parent has them. Never the working directory that ``-c``
    puts first (``""``): a ``threadbridge`` folder, or a module named like one of the
    standard library's, in the directory the program was started from would run in every
    worker. The target's own view of ``sys.path`` is the parent's, set once it has booted."""
    return [_HOME, *(p for p in sys.path if isinstance(p, str) and p and p != _HOME)]


def python_command(code: str, *args: str) -> list[str]:
    """The command line of a new interpreter that runs ``code`` (which imports
    threadbridge): this interpreter, with the flags it was started with (``-O``,
    ``-W ...``, ``-X ...``, ``-E``...), as multiprocessing gives its children, so that
    workers run targets the way the parent would; its import path is ``boot_path()``."""
    if not sys.executable:
        raise RuntimeError(
            "worker processes are started with sys.executable, which is empty here (an "
            "embedded interpreter?): set it to the path of a Python interpreter, use "
            'threadbridge.set_start_method("fork"), or backend="thread"'
        )
    flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()
    boot = f"import sys; sys.path[:] = {boot_path()!r}; {code}"
    return [sys.executable, *flags, "-c", boot, *args]
