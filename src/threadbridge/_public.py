"""Public names say they come from ``threadbridge`` (as trio's do), not from the private
module that defines them: in reprs, tracebacks, pickles and the documentation."""

from __future__ import annotations

from typing import Any


def export(*objects: Any) -> None:
    for obj in objects:
        obj.__module__ = "threadbridge"
