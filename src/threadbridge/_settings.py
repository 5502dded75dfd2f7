"""The settings a worker process takes from its parent, both halves.

In the parent: ``collect()`` what a new worker (or a fork server) needs before any job
(the import path, argv, the main script to import as ``__mp_main__``, the directory),
and a ``Follower`` per worker for what changed since it last heard. In the worker:
``apply()`` them, the main script's import and the pool's initializer included.

Imported by worker processes: it stays light (no anyio, no trio).
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

from . import _jobs, _pickling, _wire
from ._pickling import How

# --- in the parent -------------------------------------------------------------------------


def collect(*, warm: bool) -> dict[str, object]:
    """What a new worker (or a fork server) takes from the parent before any job: the
    import path, argv, the main script to import as __mp_main__, and (``warm``: started
    ahead of need) the modules jobs have needed so far, to import while it idles."""
    _jobs.alias_main()  # before any worker can answer with a class of the main script
    settings: dict[str, object] = {
        "sys_path": list(sys.path),
        "argv": list(sys.argv),
        "main": _jobs.main_source(),
    }
    where = cwd()
    if where is not None:
        settings["cwd"] = where
    if warm:
        settings["warm"] = ["tblib", "threadbridge._jobs", *_jobs.modules_used]
    return settings


class Follower:
    """The parent's import path, directory and environment as one worker last heard
    them: a target runs with the parent's, as it would in a thread, whether its worker
    started before or after a change."""

    __slots__ = ("cwd", "environ", "sys_path")

    def __init__(self, settings: dict[str, object], *, inherited_environ: bool) -> None:
        self.sys_path: object = settings["sys_path"]
        self.cwd: object = settings.get("cwd")
        # A worker inherits the environment as it starts, unless a fork server (which has
        # the parent's of when it started) made it: that one hears with its first job.
        self.environ = environ_snapshot() if inherited_environ else None

    def changes(self) -> dict[str, object]:
        """What changed since the worker last heard (and is now taken as heard)."""
        changed: dict[str, object] = {}
        if sys.path != self.sys_path:
            changed["sys_path"] = self.sys_path = list(sys.path)
        where = cwd()
        if where is not None and where != self.cwd:
            changed["cwd"] = self.cwd = where
        raw = getattr(os.environ, "_data", None)  # compared raw: 0.2 µs, not 20
        if raw is not None and raw != self.environ:
            changed["environ"] = dict(os.environ)
            self.environ = environ_snapshot()
        return changed


def environ_snapshot() -> object:
    raw = getattr(os.environ, "_data", None)
    return None if raw is None else dict(raw)


def cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the directory was removed: there is nothing to follow
        return None


# --- in the worker -------------------------------------------------------------------------

Tell = Callable[[int, bytes], None]  # a frame to the parent: (kind, payload)

importing_main = False  # true while the main script runs as __mp_main__
_main_imported: tuple[str, str] | None = None  # what this process imported as __mp_main__
main_error = ""  # why importing it failed, for the jobs that then cannot find their function


def apply(settings: dict[str, Any], *, pid: int, tell: Tell | None) -> bool:
    """Take the parent's settings, in the worker whose pid is ``pid`` (``tell``: how to
    send the parent a frame; None in a fork server). False if the pool's initializer
    failed here (the parent has been told)."""
    if "sys_path" in settings:
        sys.path[:] = settings["sys_path"]
    if "argv" in settings:
        sys.argv[:] = settings["argv"]
    if "environ" in settings:
        environ = settings["environ"]
        for name in [name for name in os.environ if name not in environ]:
            del os.environ[name]
        os.environ.update(environ)
    if "cwd" in settings:
        try:
            os.chdir(settings["cwd"])
        except OSError:
            pass  # gone meanwhile, or out of this process's reach: the target runs where it is
    if "authkey" in settings:
        from multiprocessing import process

        process.current_process().authkey = settings["authkey"]
    if settings.get("main"):
        try:
            _import_main(tuple(settings["main"]), tell)
        finally:
            only_the_worker(pid)
    if "initializer" in settings and not _initialize(settings["initializer"], pid, tell):
        return False
    for name in settings.get("warm", ()):
        # What jobs have needed so far, imported while this worker idles: the call
        # that takes it does not wait for them.
        try:
            importlib.import_module(name)
        except BaseException:
            pass  # the job that needs it will say why
    return True


def only_the_worker(pid: int) -> None:
    """After user code that may have forked (the main script's import, the initializer):
    a child that returned from it must not go on to read the worker's jobs."""
    if os.getpid() != pid:
        os._exit(0)


def _initialize(payload: bytes, pid: int, tell: Tell | None) -> bool:
    """Run the pool's initializer; if it raises, send its error to the parent."""
    if tell is not None:
        tell(_wire.INITIALIZING, b"")
    try:
        try:
            func, args = pickle.loads(payload)
            func(*args)
        finally:
            only_the_worker(pid)
    except BaseException as exc:
        if tell is not None:
            tell(_wire.INIT_FAILED, _pickling.dumps_answer(How.RAISED, exc, False))
        return False
    return True


def _import_main(source: tuple[str, str], tell: Tell | None) -> None:
    """Import the parent's main script as ``__mp_main__`` and make ``__main__`` refer to
    it, as multiprocessing's spawn does: its functions and classes can then travel by
    reference, and its ``if __name__ == "__main__":`` block does not run here. Reports the
    names it binds to the parent."""
    global importing_main, main_error, _main_imported
    how, where = source
    current = sys.modules["__main__"]
    if _main_imported == source:  # a fork server imported it already (not multiprocessing,
        _report_main_names(source, current, tell)  # whose import names __main__ __mp_main__ too)
        return
    if how == "path" and getattr(current, "__file__", None) == where:
        return  # a forked worker: the parent's own main is here already
    if how == "name" and getattr(getattr(current, "__spec__", None), "name", None) == where:
        return
    import runpy

    importing_main = True
    try:
        if how == "name":
            content = runpy.run_module(where, run_name="__mp_main__", alter_sys=True)
        else:
            content = runpy.run_path(where, run_name="__mp_main__")
    except BaseException as exc:
        main_error = (
            f"the worker imports the main script ({where}) as __mp_main__, so that its "
            f"functions can run here, and that failed: {type(exc).__name__}: {exc}"
        )
        import traceback

        print(f"threadbridge: {main_error}", file=sys.stderr)
        traceback.print_exc()
        return
    finally:
        importing_main = False
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module
    _main_imported = source
    _jobs.main_names_here = frozenset(name for name in content if isinstance(name, str))
    _report_main_names(source, module, tell)


def _report_main_names(
    source: tuple[str, str], module: types.ModuleType, tell: Tell | None
) -> None:
    if tell is not None:  # a worker (a fork server has no parent to tell)
        names = sorted(name for name in vars(module) if isinstance(name, str))
        tell(_wire.NAMES, pickle.dumps((source, names)))
