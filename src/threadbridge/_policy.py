"""The escalation policy and the stages a piece of work can end in."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ._public import export


class Stage(enum.Enum):
    """Where a piece of work stands, or how it ended.

    * ``RUNNING``: not ended yet.
    * ``FINISHED``: ran to its own end with no stop requested.
    * ``COOPERATIVE``: ended after its token was set, before rung 2.
    * ``INTERRUPTED``: ended after rung 2 (an injected exception, or SIGTERM for a process).
    * ``ABANDONED``: a thread left running at rung 3; its result is discarded.
    * ``KILLED``: a worker process SIGKILLed at rung 3.

    Example:

        handle = threadbridge.spawn(crunch, rows)
        stage = await handle.stop()
        if stage is threadbridge.Stage.ABANDONED:
            log.warning("crunch is still running in the background")
    """

    RUNNING = "running"
    FINISHED = "finished"
    COOPERATIVE = "cooperative"
    INTERRUPTED = "interrupted"
    ABANDONED = "abandoned"
    KILLED = "killed"


def _check_duration(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Policy.{name} must be a number of seconds (int or float), got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"Policy.{name} must be zero or more seconds (math.inf to wait forever), got {value!r}"
        )


@dataclass(frozen=True)
class Policy:
    """How hard to try when a piece of work must stop.

    Args:
        grace: seconds between rung 1 (the token is set) and rung 2.
        interrupt: whether to use rung 2 at all (an exception injected into the thread,
            SIGTERM for a process). With ``False`` the ladder goes from rung 1 straight to
            rung 3 once ``grace`` has passed.
        interrupt_grace: seconds between rung 2 and rung 3.
        force: whether to use rung 3 (abandon the thread, SIGKILL the process). With
            ``False`` a cancelled await waits, shielded, until the target ends by itself.

    Raises:
        ValueError: a grace period is negative or NaN.
        TypeError: a grace period is not a number, or a flag is not a bool.

    Example:

        fast = Policy(grace=0.1, interrupt_grace=0.5)
        await run_killable(crunch, data, policy=fast)
    """

    grace: float = 1.0
    interrupt: bool = True
    interrupt_grace: float = 1.0
    force: bool = True

    def __post_init__(self) -> None:
        _check_duration("grace", self.grace)
        _check_duration("interrupt_grace", self.interrupt_grace)
        for name in ("interrupt", "force"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Policy.{name} must be True or False, got {getattr(self, name)!r}")


DEFAULT_POLICY = Policy()


def chosen_policy(policy: object, what: str) -> Policy:
    """The policy a caller's ``policy=`` names (None: the default), or a clear error."""
    if policy is None:
        return DEFAULT_POLICY
    if not isinstance(policy, Policy):
        raise TypeError(f"{what}: policy must be a threadbridge.Policy or None, got {policy!r}")
    return policy


# Set by threadbridge.testing.set_testing(): caps on every policy's grace periods, so that
# test suites do not wait out real ones. (grace, interrupt_grace) or None.
testing_caps: tuple[float, float] | None = None


def effective_graces(policy: Policy) -> tuple[float, float]:
    caps = testing_caps
    if caps is None:
        return policy.grace, policy.interrupt_grace
    return min(policy.grace, caps[0]), min(policy.interrupt_grace, caps[1])


export(Stage, Policy)
