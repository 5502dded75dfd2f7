"""Handle: the public face of one run."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Generic, TypeVar

from ._ladder import Run
from ._policy import Policy, Stage
from ._public import export

T_co = TypeVar("T_co", covariant=True)


class Handle(Generic[T_co]):
    """A running piece of work: await it for its result, cancel it to stop it.

    Made by ``threadbridge.spawn()``. These two lines are equivalent:

        result = await run_killable(func, *args)
        result = await spawn(func, *args)

    Cancellation:
        Cancelling a task that awaits the handle (any cancel scope, ``task.cancel()``, a
        task group tearing down) starts the ladder, waits shielded until the work has
        stopped or been given up on, then lets the cancellation propagate.
    """

    __slots__ = ("__weakref__", "_run", "_taken")

    def __init__(self, run: Run) -> None:
        self._run = run
        # The outcome, taken out of the settled run by the first await: each await gives
        # it, and it lives as long as this handle (not as long as the run).
        self._taken: tuple[Any, BaseException | None] | None = None

    @property
    def stage(self) -> Stage:
        """Where the work stands (``RUNNING``) or how it ended."""
        return self._run.stage

    @property
    def stopped_at(self) -> str | None:
        """The target's stack as the ladder went past rung 1 (rung 2, or rung 3 for a
        thread), formatted as a traceback's frames; None while it has not.

        Threads: taken as rung 2 and rung 3 fire (the latest counts). Worker processes
        and Ray tasks: taken inside the worker as rung 2 fires (a worker killed at rung 3
        without rung 2 before it, or a Ray task killed at rung 3, may leave it None).
        """
        return self._run.stopped_at

    @property
    def policy(self) -> Policy:
        """The escalation policy this handle climbs by."""
        return self._run.policy

    @property
    def name(self) -> str:
        """The target's name, as used in log messages."""
        return self._run.name

    def done(self) -> bool:
        """Whether the work has ended or been given up on."""
        return self._run.stage is not Stage.RUNNING

    def cancel(self) -> None:
        """Start climbing the ladder now and return at once. Idempotent.

        Sets the target's token (rung 1); after ``policy.grace`` the ladder interrupts
        (rung 2) and after ``policy.interrupt_grace`` more it abandons or kills (rung 3),
        each rung skipped if the work has ended by then. Safe to call from any thread.
        """
        self._run.cancel()

    async def stop(self) -> Stage:
        """Climb the ladder and wait until the work has stopped or been given up on.

        Returns:
            The stage the work ended in.

        Raises:
            RuntimeError: called from another event loop than the one that spawned it.

        Cancellation:
            If the task calling ``stop()`` is cancelled, it still waits (shielded) for the
            ladder, then the cancellation propagates.
        """
        run = self._run
        self._check_loop("stop")
        run.cancel()
        await run.link.wait_settled(run)
        return run.stage

    async def wait(self) -> T_co:
        """Wait for the target's result, and return it or raise its exception.

        Raises:
            TargetCancelled: the work was stopped through ``cancel()`` or ``stop()``
                (not by cancelling this await) and ended by being cancelled, interrupted,
                abandoned or killed.
            RuntimeError: awaited from another event loop than the one that spawned it.

        Cancellation:
            * rung 1: the target's token is set (``cancel_requested()`` turns true).
            * rung 2, after ``policy.grace``: ``TargetCancelled`` is raised inside it.
            * rung 3, after ``policy.interrupt_grace``: the thread is abandoned, or the
              worker process killed.
            Then the native cancellation propagates; the target's own outcome, if it
            ended meanwhile, is discarded.
        """
        run = self._run
        self._check_loop("await")
        await run.link.wait_settled(run)
        if self._taken is None:
            self._taken = run.take()
        return run.settle(*self._taken)  # type: ignore[no-any-return]

    def _check_loop(self, what: str) -> None:
        if not self._run.link.is_current():
            raise RuntimeError(
                f"this handle belongs to another event loop; {what} it in the loop that "
                "called spawn()"
            )

    def __await__(self) -> Generator[Any, None, T_co]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<threadbridge.Handle {self._run.name} {self._run.stage.name}>"


export(Handle)
