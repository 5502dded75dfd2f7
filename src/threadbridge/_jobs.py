"""How a target and its arguments travel to a worker process.

Whatever the worker can import travels by reference, as plain pickle does it: functions
and classes of importable modules, and those of the main script, which every worker
imports as ``__mp_main__`` (as multiprocessing's spawn does). A lambda, a closure or a
nested function of such a module travels as its code (marshalled: its real file name and
line numbers go with it) and its closure; its globals are the worker's own module's, so a
module's data never travels with every call. Only names that the worker's import of the
main script does not bind (what its ``if __name__ == "__main__":`` block set) go along.

What no worker can import (functions of ``-c`` or interactive code, notebooks, classes
made at run time) travels by value with cloudpickle, imported only then.

Worker processes import this module to rebuild functions: it stays light.
"""

from __future__ import annotations

import io
import marshal
import os
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

_PROTOCOL = pickle.HIGHEST_PROTOCOL


# --- the main script, as workers see it --------------------------------------------------


_main_seen: tuple[object, tuple[str, str] | None] = (None, None)


def main_source() -> tuple[str, str] | None:
    """How a worker imports the parent's main module: ("name", module) for ``python -m
    module``, ("path", file) for a script; None when it cannot (``-c``, interactive
    code, notebooks, a package's ``__main__.py``, which runs its work unconditionally)."""
    global _main_seen
    main = sys.modules.get("__main__")
    if _main_seen[0] is not main:
        _main_seen = (main, _main_source(main))
    return _main_seen[1]


def alias_main() -> None:
    """Let this process find what a worker pickled as ``__mp_main__``: the classes of the
    main script, which a worker defined by importing it under that name (a dataclass it
    returns, an exception class it raises). ``sys.modules["__mp_main__"]`` becomes this
    process's ``__main__``, as importing multiprocessing does."""
    if main_source() is not None:
        main = sys.modules["__main__"]
        if sys.modules.get("__mp_main__") is not main:
            sys.modules["__mp_main__"] = main


def _main_source(main: object) -> tuple[str, str] | None:
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str):
        if name == "__main__" or name.endswith(".__main__"):
            return None
        return ("name", name)
    path = getattr(main, "__file__", None)
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    if not path.endswith((".py", ".pyw")):
        # A console-script launcher (pytest, uvicorn, ipython...), not the user's code:
        # importing it would import its whole tool into every worker (every test that
        # starts a worker would pay for pytest). Its functions travel by value instead.
        return None
    return ("path", os.path.abspath(path))


# The names that the workers' import of the main script binds, once a worker has reported
# them (None before): a by-value function's other globals travel with it.
_main_names: frozenset[str] | None = None
_main_names_for: tuple[str, str] | None = None


# In a worker that imported the main script (itself, or its fork server did): the names
# that import bound. A by-value function's carried globals never replace them, so that
# every such worker gives a function of the script the same globals, whichever carried
# what before the parent knew these names.
main_names_here: frozenset[str] = frozenset()


def set_main_names(source: tuple[str, str], names: frozenset[str]) -> None:
    global _main_names, _main_names_for
    _main_names, _main_names_for = names, source


# Modules that jobs have needed, for standby workers to import while they idle.
modules_used: dict[str, None] = {}
_MAX_MODULES = 200


def _note_module(name: str) -> None:
    if name not in modules_used and len(modules_used) < _MAX_MODULES:
        modules_used[name] = None


# --- pickling a job ------------------------------------------------------------------------


# Functions found by module and name: a module's own, which live as long as it does.
_known_by_reference: set[types.FunctionType] = set()
_MAX_KNOWN = 10_000


class _NeedsCloudpickle(Exception):
    """Something in the job cannot be imported by a worker: it travels by value."""


def _lookup(module: object, qualname: str) -> object:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _Plan:
    """What this job's pickling knows of the main script and of importable modules."""

    __slots__ = ("main", "main_names")

    def __init__(self) -> None:
        self.main = main_source()
        self.main_names = _main_names if _main_names_for == self.main else None

    def importable(self, module_name: str) -> bool:
        if module_name == "__main__":
            return self.main is not None
        module = sys.modules.get(module_name)
        return module is not None and getattr(module, "__spec__", None) is not None

    def by_reference(self, obj: Any) -> bool:
        """Whether the worker finds ``obj`` by its module and qualified name."""
        qualname = getattr(obj, "__qualname__", "")
        if "<" in qualname:  # <lambda>, <locals>
            return False
        try:
            return _lookup(sys.modules[obj.__module__], qualname) is obj
        except (AttributeError, KeyError):
            return False

    def reduce_function(self, func: types.FunctionType) -> Any:
        if func in _known_by_reference:
            return NotImplemented
        module_name = func.__module__
        if not isinstance(module_name, str) or not self.importable(module_name):
            raise _NeedsCloudpickle
        if self.by_reference(func):
            _note_module(module_name)
            if len(_known_by_reference) < _MAX_KNOWN:
                _known_by_reference.add(func)
            return NotImplemented  # plain pickle: module and name
        return self.by_value(func, module_name)

    def by_value(self, func: types.FunctionType, module_name: str) -> Any:
        code_bytes, names = _marshalled(func.__code__)
        if module_name == "__main__":
            known = self.main_names or frozenset()
            own = func.__globals__
            carried = {name: own[name] for name in names if name in own and name not in known}
        else:
            carried = {}
        cells = func.__closure__ or ()
        contents = [_cell_contents(cell) for cell in cells]
        state = (
            func.__qualname__,
            func.__defaults__,
            func.__kwdefaults__,
            func.__dict__ or None,
            contents,
            carried,
        )
        args = (code_bytes, module_name, len(cells))
        return (_make_function, args, state, None, None, _set_function_state)


# A lambda written in a loop is a new function each time, with the same code: its marshalled
# form and global names are kept (the code object with them, so that its id stays its own).
_code_cache: dict[int, tuple[types.CodeType, bytes, frozenset[str]]] = {}
_CODE_CACHE_SIZE = 512


def _marshalled(code: types.CodeType) -> tuple[bytes, frozenset[str]]:
    entry = _code_cache.get(id(code))
    if entry is None or entry[0] is not code:
        if len(_code_cache) >= _CODE_CACHE_SIZE:
            _code_cache.clear()
        entry = (code, marshal.dumps(code), frozenset(_global_names(code)))
        _code_cache[id(code)] = entry
    return entry[1], entry[2]


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


class _Empty:
    """An empty closure cell (a variable assigned after the function was made)."""

    def __reduce__(self) -> str:
        return "EMPTY_CELL"


EMPTY_CELL = _Empty()


def _cell_contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:
        return EMPTY_CELL


class _JobPickler(pickle.Pickler):
    plan: _Plan

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is types.FunctionType:
            return self.plan.reduce_function(obj)
        if kind is types.ModuleType:
            return _reduce_module(obj, self.plan)
        if isinstance(obj, type) and not self.plan.importable(obj.__module__):
            raise _NeedsCloudpickle
        return NotImplemented


def _reduce_module(module: types.ModuleType, plan: _Plan) -> Any:
    name = module.__name__
    if not plan.importable(name):
        raise _NeedsCloudpickle
    return (_import, (name,))


def _import(name: str) -> types.ModuleType:
    if name == "__main__":
        return sys.modules["__main__"]
    import importlib

    return importlib.import_module(name)


def _cloud_pickler(file: io.BytesIO, plan: _Plan) -> pickle.Pickler:
    import cloudpickle

    class CloudJobPickler(cloudpickle.Pickler):  # type: ignore[misc,name-defined,unused-ignore]
        def reducer_override(self, obj: Any) -> Any:
            kind = type(obj)
            if kind is types.CodeType:
                try:  # as itself, with its file name (cloudpickle replaces it)
                    return (marshal.loads, (marshal.dumps(obj),))
                except ValueError:  # pragma: no cover - a code object made by hand
                    pass
            elif kind is types.FunctionType or kind is types.ModuleType:
                try:
                    if kind is types.ModuleType:
                        return _reduce_module(obj, plan)
                    return plan.reduce_function(obj)
                except _NeedsCloudpickle:
                    pass
            return super().reducer_override(obj)

    _note_module("cloudpickle")
    return CloudJobPickler(file, protocol=_PROTOCOL)  # type: ignore[no-any-return,unused-ignore]


def _plain_pickler(file: io.BytesIO, plan: _Plan) -> pickle.Pickler:
    pickler = _JobPickler(file, _PROTOCOL)
    pickler.plan = plan
    return pickler


def _dump(make: Callable[[io.BytesIO, _Plan], pickle.Pickler], plan: _Plan, obj: object) -> bytes:
    file = io.BytesIO()
    make(file, plan).dump(obj)
    return file.getvalue()


def dumps_job(func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
    """Pickle a job for a worker, or raise a TypeError that names what cannot travel."""
    plan = _Plan()
    try:
        return _dump(_plain_pickler, plan, (func, args))
    except Exception:
        pass  # something needs cloudpickle, or cannot travel at all: found out below
    try:
        return _dump(_cloud_pickler, plan, (func, args))
    except Exception as exc:
        error = exc
    for index, arg in enumerate(args, 1):
        try:
            _dump(_cloud_pickler, plan, arg)
        except Exception as exc:
            raise TypeError(
                f"argument {index} to {name} ({type(arg).__qualname__} {arg!r:.60}) cannot "
                f'be pickled for backend="process": {exc}. Pass a picklable value, or run '
                'it with backend="thread"'
            ) from None
    raise TypeError(
        f'{name} cannot be pickled for backend="process": {error}. Use a function that '
        "can be pickled (lambdas and closures travel, but not what they capture if that "
        'cannot be pickled), or backend="thread"'
    ) from None


# --- in the worker: rebuilding a function ------------------------------------------------


_loaded_code: dict[bytes, types.CodeType] = {}


def _make_function(code_bytes: bytes, module_name: str, ncells: int) -> types.FunctionType:
    code = _loaded_code.get(code_bytes)
    if code is None:
        if len(_loaded_code) >= _CODE_CACHE_SIZE:
            _loaded_code.clear()
        code = _loaded_code[code_bytes] = marshal.loads(code_bytes)
    closure = tuple(types.CellType() for _ in range(ncells)) if ncells else None
    func = types.FunctionType(code, vars(_import(module_name)), code.co_name, None, closure)
    func.__module__ = module_name
    return func


def _set_function_state(func: types.FunctionType, state: tuple[Any, ...]) -> types.FunctionType:
    qualname, defaults, kwdefaults, attributes, contents, carried = state
    func.__qualname__ = qualname
    func.__defaults__ = defaults
    func.__kwdefaults__ = kwdefaults
    if attributes:
        func.__dict__.update(attributes)
    for cell, value in zip(func.__closure__ or (), contents, strict=True):
        if value is not EMPTY_CELL:
            cell.cell_contents = value
    if carried:
        skip = main_names_here
        if skip:
            carried = {name: value for name, value in carried.items() if name not in skip}
        func.__globals__.update(carried)
    return func
