"""How one pool starts its worker processes: the start method it was given (or the one
``set_start_method()`` chose), and, for "forkserver", its own fork server, made on first
need and made again if it died."""

from __future__ import annotations

from . import _locks, _settings, _spawn
from ._errors import WorkerCrashed
from ._forkserver import ForkServer
from ._loop import Link
from ._worker_io import how_it_ended
from ._worker_owner import Process


class Starter:
    __slots__ = ("lock", "method", "server")

    def __init__(self, method: str | None) -> None:
        self.method = method  # None: set_start_method()'s choice, at each start
        self.lock = _locks.Lock()
        self.server: ForkServer | None = None

    def _method(self) -> str:
        return self.method or _spawn.current_method()

    def not_ready(self) -> bool:
        """Whether a start would wait for the fork server to import what workers need
        (the main script's import may take long). Cheap: every call may ask."""
        if self._method() != "forkserver":
            return False
        server = self.server
        return server is None or not server.ready

    async def ready(self, link: Link) -> None:
        """Start the fork server if need be, and wait (in the loop, cancellably) until it
        is ready or has died."""
        from ._loop._waits import called_back

        server = self._server()
        if not server.ready:
            await called_back(link, server.when_ready)

    def _server(self) -> ForkServer:
        with self.lock:
            server = self.server
            if server is None or not server.alive:
                if server is not None:
                    server.close()  # its socket, and it is reaped
                server = self.server = ForkServer(_settings.collect(warm=True))
            return server

    def start(self, job_r: int, control_r: int, result_w: int) -> Process:
        """Start a worker process; it gets the three pipe ends. Raises WorkerCrashed if
        the fork server ended before it could start one."""
        method = self._method()
        if method != "forkserver":
            return _spawn.start_worker(job_r, control_r, result_w, method)
        server = self._server()
        try:
            return server.start_worker(job_r, control_r, result_w)
        except OSError:
            # Its socket failed (the server has died, or is dying), or nothing was left
            # to start a worker with (out of descriptors, say): which, its exit tells.
            if server.alive and server.exit_code() is None:
                raise
        # The server ended before it could start a worker: it cannot start (its main
        # script's import ended the process, an interpreter that cannot run...).
        how, signum, exitcode = how_it_ended(server.proc, server.exit_code(), "as it started")
        raise WorkerCrashed(
            f"the fork server of this pool (pid {server.proc.pid}) {how}, before it could "
            "start a worker: workers could not start (its standard error says why: an "
            "interpreter that cannot run, a main script whose import ends the process)",
            signal=signum,
            exitcode=exitcode,
            pid=server.proc.pid,
        )

    def kept(self) -> int | None:
        """The fork server's pid, while it runs."""
        server = self.server
        return server.proc.pid if server is not None and server.alive else None

    def close(self) -> None:
        with self.lock:
            server, self.server = self.server, None
        if server is not None:
            server.close()

    def forget(self) -> None:
        """In a forked child: the parent's server is not ours."""
        if self.server is not None:
            self.server.forget()
