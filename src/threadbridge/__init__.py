"""Run blocking work from asyncio and trio, and really stop it when the await is cancelled.

::

    result = await threadbridge.run_killable(blocking_function, arg)

When the awaiting task is cancelled, the work climbs a ladder (cooperative stop, an
exception raised inside it, then abandonment or a kill) until it has stopped, and only
then does the cancellation propagate.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load on first use (PEP 562), so that a worker process, which imports threadbridge
# to run its targets, pays only for the small modules it uses (no anyio, no trio).
_WHERE = {
    "CallTimeout": "_call",
    "call": "_call",
    "killable": "_call",
    "Executor": "_executor",
    "Future": "_future",
    "default_limiter": "_api",
    "from_thread": "from_thread",
    "run_killable": "_api",
    "spawn": "_api",
    "RemoteError": "_errors",
    "TargetCancelled": "_errors",
    "WorkerCrashed": "_errors",
    "Handle": "_handle",
    "ProcessPool": "_process_backend",
    "set_start_method": "_spawn",
    "Policy": "_policy",
    "Stage": "_policy",
    "RunningTarget": "_stats",
    "Stats": "_stats",
    "running": "_stats",
    "stats": "_stats",
    "Token": "_token",
    "cancel_requested": "_token",
    "check_cancelled": "_token",
    "current_token": "_token",
    "sleep": "_token",
    "uninterruptible": "_token",
}

if TYPE_CHECKING:
    from . import from_thread as from_thread
    from ._api import default_limiter as default_limiter
    from ._api import run_killable as run_killable
    from ._api import spawn as spawn
    from ._call import CallTimeout as CallTimeout
    from ._call import call as call
    from ._call import killable as killable
    from ._errors import RemoteError as RemoteError
    from ._errors import TargetCancelled as TargetCancelled
    from ._errors import WorkerCrashed as WorkerCrashed
    from ._executor import Executor as Executor
    from ._future import Future as Future
    from ._handle import Handle as Handle
    from ._policy import Policy as Policy
    from ._policy import Stage as Stage
    from ._process_backend import ProcessPool as ProcessPool
    from ._spawn import set_start_method as set_start_method
    from ._stats import RunningTarget as RunningTarget
    from ._stats import Stats as Stats
    from ._stats import running as running
    from ._stats import stats as stats
    from ._token import Token as Token
    from ._token import cancel_requested as cancel_requested
    from ._token import check_cancelled as check_cancelled
    from ._token import current_token as current_token
    from ._token import sleep as sleep
    from ._token import uninterruptible as uninterruptible

__all__ = (
    "CallTimeout",
    "Executor",
    "Future",
    "Handle",
    "Policy",
    "ProcessPool",
    "RemoteError",
    "RunningTarget",
    "Stage",
    "Stats",
    "TargetCancelled",
    "Token",
    "WorkerCrashed",
    "call",
    "cancel_requested",
    "check_cancelled",
    "current_token",
    "default_limiter",
    "from_thread",
    "killable",
    "run_killable",
    "running",
    "set_start_method",
    "sleep",
    "spawn",
    "stats",
    "uninterruptible",
)

__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'threadbridge' has no attribute {name!r}") from None
    value = importlib.import_module(f".{module}", __name__)
    if module != name:  # a name defined in a module; otherwise the public submodule itself
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})
