"""Exceptions that threadbridge raises, inside targets and in callers."""

from __future__ import annotations

from ._public import export


class TargetCancelled(BaseException):
    """Raised inside a target when a stop has been requested.

    It derives from ``BaseException``, like ``KeyboardInterrupt``, so that a
    target's ``except Exception:`` does not swallow it.  ``check_cancelled()`` and
    ``sleep()`` raise it at rung 1; rung 2 raises it wherever the target happens to be.

    A caller sees it only when it awaits a handle that was stopped through
    ``Handle.cancel()`` or ``Handle.stop()`` rather than by cancelling the await.

    Example:

        def export(rows, path):
            with open(path, "w") as out:
                try:
                    for row in rows:
                        threadbridge.check_cancelled()
                        out.write(render(row))
                except threadbridge.TargetCancelled:
                    out.write("# cancelled\\n")  # tidy up, then let it propagate
                    raise
    """


class WorkerCrashed(Exception):
    """A worker process died without answering.

    Attributes:
        exitcode: the process's exit status, when it exited (``os._exit(3)`` gives 3).
        signal: the number of the signal that killed it, when a signal did.
        pid: the worker process's id.

    Example:

        try:
            await run_killable(native_code, backend="process")
        except threadbridge.WorkerCrashed as exc:
            log.error("worker died: exit code %s, signal %s", exc.exitcode, exc.signal)
        # the pool replaces the worker: the next call runs as usual
    """

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        signal: int | None = None,
        pid: int | None = None,
    ):
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal
        self.pid = pid

    def __reduce__(self) -> tuple[object, ...]:
        state = {"exitcode": self.exitcode, "signal": self.signal, "pid": self.pid}
        return (type(self), (str(self),), state)


class RemoteError(Exception):
    """An exception raised in a worker process that could not be sent back as itself.

    Attributes:
        type_name: the qualified name of the original exception's type.
        message: ``str()`` of the original exception.
        traceback_text: the formatted traceback from the worker.

    Example:

        try:
            await run_killable(uses_a_socket, backend="process")
        except threadbridge.RemoteError as exc:
            log.error("worker raised %s: %s\\n%s", exc.type_name, exc.message,
                      exc.traceback_text)
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


export(TargetCancelled, WorkerCrashed, RemoteError)
