"""Internal errors: breaches of threadbridge's own contracts (a run reported twice, a
limiter token given back that was not held, a watcher of the loop that raised). They are
bugs of threadbridge: logged and recorded, never raised into the program. threadbridge's
own test suite fails any test during which one happened."""

from __future__ import annotations

import logging

logger = logging.getLogger("threadbridge")

violations: list[str] = []


def violation(message: str) -> None:
    violations.append(message)
    logger.error("internal error, please report it: %s", message)
