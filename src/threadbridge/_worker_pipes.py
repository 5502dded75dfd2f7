"""The pipes the parent writes to one worker: jobs (and settings, and the ask to exit)
on one, rungs 1 and 2 on the other."""

from __future__ import annotations

from . import _locks
from ._worker_io import close, write_frame


class WorkerPipes:
    """The parent's ends of a worker's job and control pipes. Their numbers are guarded
    against reuse: a write in progress keeps them open, and the last one out closes them
    once the worker has ended."""

    __slots__ = ("control_fd", "ending", "job_fd", "lock", "writers")

    def __init__(self, job_fd: int, control_fd: int) -> None:
        self.job_fd = job_fd
        self.control_fd = control_fd
        self.lock = _locks.Lock()
        self.writers = 0
        self.ending = False

    def write(
        self, kind: int, job_id: int = 0, payload: bytes = b"", *, control: bool = False
    ) -> None:
        """A frame to the worker (on its control pipe if ``control``), unless it has
        ended. The pipe stays open until the write is done: were it closed meanwhile, a
        new pipe (another worker's) could be given its number, and the rest of the frame
        would go there."""
        with self.lock:
            if self.ending:
                return  # the worker has ended: nothing reads any more
            self.writers += 1
            fd = self.control_fd if control else self.job_fd
        try:
            write_frame(fd, kind, job_id, payload)
        except OSError:
            pass  # the worker has died; end of file on its answers reports it
        finally:
            self._done_writing()

    def _done_writing(self) -> None:
        with self.lock:
            self.writers -= 1
            last = self.ending and not self.writers
        if last:
            self._close()

    def end(self) -> None:
        """The worker has ended: close the pipes now, or as the last write still in
        progress (to a pipe a stray process may hold) ends."""
        with self.lock:
            self.ending = True
            now = not self.writers
        if now:
            self._close()

    def _close(self) -> None:
        # Forgotten before they are closed: a child forked meanwhile must not close
        # their numbers, which a new pipe may reuse.
        fds, self.job_fd, self.control_fd = (self.job_fd, self.control_fd), -1, -1
        for fd in fds:
            close(fd)

    def forget(self) -> None:
        """In a forked child of the parent: close this copy of the pipes, if the parent
        still has them open (a number it has closed may be in use again by now)."""
        for fd in (self.job_fd, self.control_fd):
            if fd >= 0:
                close(fd)
