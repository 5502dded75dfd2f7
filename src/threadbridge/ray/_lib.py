"""Ray itself, or a clear error: what ``import threadbridge.ray`` needs first."""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any


def unavailable(what: str) -> NotImplementedError | None:
    """Why the Ray backend cannot work on this platform, or None."""
    if sys.platform == "win32" or not hasattr(signal, "pthread_kill"):
        return NotImplementedError(
            f'{what}: backend="ray" delivers rung 2 with POSIX signals, which this '
            "platform lacks (Windows has none); run the driver and the cluster on "
            "Linux or macOS"
        )
    return None


try:
    # Through importlib: Ray's own type hints are partial; here it is typed as Any.
    ray: Any = importlib.import_module("ray")
    importlib.import_module("ray.exceptions")
    importlib.import_module("ray.util.scheduling_strategies")
except ImportError as exc:  # pragma: no cover - tested by a subprocess without Ray
    # Where the backend could not work anyway, that is what to say, not "install Ray".
    refusal = unavailable("threadbridge.ray")
    if refusal is not None:
        raise refusal from None
    raise ImportError(
        'threadbridge.ray needs Ray: install it with pip install "threadbridge[ray]"'
    ) from exc
