"""Exceptions that threadbridge raises, inside targets and in callers."""

from __future__ import annotations


class TargetCancelled(BaseException):
    """Raised inside a target when a stop has been requested.

    It derives from :class:`BaseException`, like :class:`KeyboardInterrupt`, so that a
    target's ``except Exception:`` does not swallow it.  ``check_cancelled()`` and
    ``sleep()`` raise it at rung 1; rung 2 raises it wherever the target happens to be.

    A caller sees it only when it awaits a handle that was stopped through
    :meth:`Handle.cancel` or :meth:`Handle.stop` rather than by cancelling the await.
    """


class WorkerCrashed(Exception):
    """A worker process died without answering.

    Attributes:
        exitcode: the process's exit status, when it exited (``os._exit(3)`` gives 3).
        signal: the number of the signal that killed it, when a signal did.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, signal: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self),), {"exitcode": self.exitcode, "signal": self.signal})


class RemoteError(Exception):
    """An exception raised in a worker process that could not be sent back as itself.

    Attributes:
        type_name: the qualified name of the original exception's type.
        message: ``str()`` of the original exception.
        traceback_text: the formatted traceback from the worker.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.traceback_text))

    def __str__(self) -> str:
        return (
            f"{self.type_name}: {self.message}\n\nTraceback in the worker:\n{self.traceback_text}"
        )
