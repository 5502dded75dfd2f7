"""Whether the calling thread runs an event loop, asked without importing either loop:
targets in worker processes ask it too."""

from __future__ import annotations

import sys


def in_event_loop() -> bool:
    """Whether the calling thread runs an asyncio or trio event loop (imports neither)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and asyncio._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            return False
        return True
    return False
