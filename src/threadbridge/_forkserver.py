"""The "forkserver" start method: workers forked from a small server process.

The server is a fresh interpreter (safe to start from a parent with threads) that imports
what workers need (threadbridge's worker code, the main script as ``__mp_main__``, the
modules jobs have needed) and then forks a worker for each request: a start costs a fork
of a warm, single-threaded process instead of a new interpreter. One server per pool; it
exits when its pool ends, or when its parent dies (end of file on its socket).

The parent and the server talk over a Unix socket pair. Parent to server: ``S`` (start a
worker; its three pipe ends travel as SCM_RIGHTS) and ``R pid`` (reap it). Server to
parent: ``P pid`` (the worker started) and ``X pid code`` (it exited: its return code,
negative for a signal). The server reports an exit without reaping (``WNOWAIT``) and
reaps only when asked, so that the exited worker keeps its process group id taken until
the parent has killed what was left in the group, as for a worker that is its own child.
"""

from __future__ import annotations

import os
import pickle
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _locks

_SHORT = struct.Struct("!cq")  # S 0, R pid, P pid, Y 0 (ready: it has imported what it needs)
_EXIT = struct.Struct("!cqq")  # X pid code
_BOOT = "from threadbridge._forkserver import serve; serve()"

# The server reports its workers' exits without reaping them (os.waitid with WNOWAIT, on
# macOS only from Python 3.13), so that a process group id cannot be reused before the
# parent has killed what is left in it.
AVAILABLE = (
    hasattr(socket, "send_fds")
    and hasattr(os, "fork")
    and hasattr(os, "waitid")
    and sys.platform != "win32"
)


# --- the parent's side -------------------------------------------------------------------


class ForkServed:
    """The parts of subprocess.Popen that the pool uses, for a worker a server forked."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: int | None = None
        self._status: int | None = None  # reported by the server; not reaped yet
        self._done = _locks.Condition()

    def exited(self) -> bool:
        return self._status is not None or self.returncode is not None

    def _exited(self, code: int) -> None:
        with self._done:
            self._status = code
            self._done.notify_all()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while self._status is None and self.returncode is None:
                if not self.server.alive:
                    return self._orphaned(deadline)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
                self._done.wait(None if remaining is None else min(remaining, 0.5))
            if self.returncode is None:
                self.returncode = self._status
                self.server.reap(self.pid)
            return self.returncode  # type: ignore[return-value]

    def _orphaned(self, deadline: float | None) -> int:
        """The server is gone (killed from outside): its workers were handed to init,
        which reaps them; all we can know is when the process is gone."""
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -signal.SIGKILL  # how it ended is unknown
                return self.returncode
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), 0)
            time.sleep(0.005)


class ForkServer:
    """A fork server, seen from the pool that owns it."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from ._interpreter import python_command

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                python_command(_BOOT, str(theirs.fileno())),
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # Ctrl-C and the parent's group signals pass it by
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.alive = True
        # Set once the server has imported what workers need (the main script's import
        # may take long, or never end), or has died: a start no longer waits for it.
        self.ready = False
        self._when_ready: list[Callable[[], object]] = []
        self.lock = _locks.Lock()  # one start at a time
        self.lock_ready = _locks.Lock()
        self.started: queue.Queue[ForkServed | None] = queue.Queue()
        self.workers: dict[int, ForkServed] = {}
        data = pickle.dumps(settings)
        try:
            ours.sendall(struct.pack("!q", len(data)) + data)
        except OSError:
            pass  # it died as it started: its reader sees the socket's end, and says so
        self.reader = threading.Thread(
            target=self._read, name="threadbridge-forkserver", daemon=True
        )
        self.reader.start()

    def start_worker(self, job_r: int, control_r: int, result_w: int) -> ForkServed:
        with self.lock:
            if not self.alive:
                raise OSError("the fork server has exited")
            socket.send_fds(self.sock, [_SHORT.pack(b"S", 0)], [job_r, control_r, result_w])
            worker = self.started.get()
        if worker is None:
            raise OSError("the fork server exited before starting a worker")
        return worker

    def when_ready(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (from the reader thread, or at once) when the server is ready
        or dead."""
        with self.lock_ready:
            if not self.ready:
                self._when_ready.append(callback)
                return
        callback()

    def _set_ready(self) -> None:
        with self.lock_ready:
            self.ready = True
            callbacks, self._when_ready = self._when_ready, []
        for callback in callbacks:
            callback()

    def exit_code(self, timeout: float = 5.0) -> int | None:
        """How the server process ended (None: it still runs after ``timeout``)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def reap(self, pid: int) -> None:
        try:
            self.sock.sendall(_SHORT.pack(b"R", pid))
        except OSError:
            pass  # the server is gone: init reaps its children

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while buffer:
                kind = buffer[:1]
                size = _EXIT.size if kind == b"X" else _SHORT.size
                if len(buffer) < size:
                    break
                message, buffer = buffer[:size], buffer[size:]
                if kind == b"Y":
                    self._set_ready()
                elif kind == b"P":
                    _, pid = _SHORT.unpack(message)
                    worker = self.workers[pid] = ForkServed(self, pid)
                    self.started.put(worker)
                else:
                    _, pid, code = _EXIT.unpack(message)
                    exited = self.workers.pop(pid, None)
                    if exited is not None:
                        exited._exited(code)
        self.alive = False
        self._set_ready()  # dead: a start now fails at once, and says why
        self.started.put(None)  # a start that was waiting
        for worker in list(self.workers.values()):
            with worker._done:
                worker._done.notify_all()

    def close(self, grace: float = 1.0) -> None:
        """End the server (its workers have been ended already). Blocks up to ``grace``."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=grace)

    def forget(self) -> None:
        """In a forked child of the parent: close this copy of the server's socket."""
        self.sock.close()


# --- the server ----------------------------------------------------------------------------


def serve() -> None:
    """Entry point of the server process: the socket's descriptor is its argument."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    size = struct.unpack("!q", _recv_exactly(sock, 8))[0]
    _preload(pickle.loads(_recv_exactly(sock, size)))
    sock.sendall(_SHORT.pack(b"Y", 0))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    # A parent that blocks SIGCHLD passes its mask on, even through exec: the server would
    # never hear of its workers' exits (each reap would wait out its bound).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    children: set[int] = set()
    reported: set[int] = set()
    fds: list[int] = []
    buffer = b""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                _drain(wake_r)
                _report_exits(sock, children, reported)
                continue
            data, received, _, _ = socket.recv_fds(sock, 4096, 3)
            if not data:
                os._exit(0)  # the parent closed us, or died: our workers go by themselves
            fds += received
            buffer += data
            while len(buffer) >= _SHORT.size:
                message, buffer = buffer[: _SHORT.size], buffer[_SHORT.size :]
                kind, pid = _SHORT.unpack(message)
                if kind == b"S":
                    job_r, control_r, result_w, fds = fds[0], fds[1], fds[2], fds[3:]
                    pid = os.fork()
                    if pid == 0:  # pragma: no cover - the worker, which never returns
                        from . import _in_worker

                        _in_worker.after_fork(job_r, control_r, result_w)
                    for fd in (job_r, control_r, result_w):
                        os.close(fd)
                    children.add(pid)
                    sock.sendall(_SHORT.pack(b"P", pid))
                elif kind == b"R" and pid in children:
                    os.waitpid(pid, 0)
                    children.discard(pid)
                    reported.discard(pid)
            _report_exits(sock, children, reported)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            os._exit(0)
        data += chunk
    return data


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _report_exits(sock: socket.socket, children: set[int], reported: set[int]) -> None:
    for pid in children - reported:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # pragma: no cover - reaped by someone else
            info = None
            code = -signal.SIGKILL
        else:
            if info is None:
                continue
            exited = info.si_code == os.CLD_EXITED
            code = info.si_status if exited else -info.si_status
        reported.add(pid)
        sock.sendall(_EXIT.pack(b"X", pid, code))


def _preload(settings: dict[str, Any]) -> None:
    """Import what workers need, the way a worker takes its settings, so that every fork
    starts with it."""
    from . import _settings, _worker_signals

    _worker_signals.watch_siginterrupt()  # before the main script can import it by name
    # A fork in the main script's import returns no further than this process.
    _settings.apply(settings, pid=os.getpid(), tell=None)
