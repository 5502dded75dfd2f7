"""Process targets: a warm pool of worker processes, and the rungs for a process.

Each event loop has its own pool; it shuts down when the loop ends. A worker leads its
own process group, so rungs 2 and 3 reach the target's children too. Every worker is
reaped by the thread that reads its results, so none is ever left a zombie.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _wire
from ._errors import WorkerCrashed
from ._ladder import SCHEDULER, Handle
from ._policy import Stage
from ._stats import COUNTERS

logger = logging.getLogger("threadbridge")

# Idle workers beyond the one kept on standby exit after this many seconds. Starting a
# worker costs tens of milliseconds, so this errs on the side of keeping them.
IDLE_TIMEOUT = 60.0
# When a loop ends, its workers get this long to exit on their own before SIGKILL.
SHUTDOWN_GRACE = 1.0
# Payloads larger than a pipe buffer are written from a helper thread, so that a slow
# worker never blocks the event loop.
_INLINE_WRITE = 60_000

_BOOT = "from threadbridge._worker import main; main()"

START_METHODS = ("spawn", "fork")
_start_method = "spawn"


def set_start_method(method: str) -> None:
    """Choose how new worker processes start.

    * ``"spawn"`` (the default): a fresh interpreter (fork and exec, or posix_spawn).
      Safe in a parent with threads; a cold start costs tens of milliseconds.
    * ``"fork"``: ``os.fork()`` of the parent, which then runs the worker loop. Starts in
      a few milliseconds, but forking a process that has threads can deadlock the child
      if another thread held a lock at that moment (Python 3.12+ warns about it). Use it
      only in a parent that runs no other threads of its own.

    Workers already running keep the method they started with.

    Raises:
        ValueError: an unknown method.

    Args:
        method: ``"spawn"`` or ``"fork"``.

    Example:

        threadbridge.set_start_method("fork")  # before the first process call
    """
    global _start_method
    if method not in START_METHODS:
        raise ValueError(f"start method must be one of {START_METHODS}, got {method!r}")
    _start_method = method


class _Forked:
    """The parts of subprocess.Popen that the pool uses, for a forked worker."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.returncode is not None:
                    return self.returncode
                flags = 0 if deadline is None else os.WNOHANG
                pid, status = os.waitpid(self.pid, flags)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    return self.returncode
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.005)


def _fork_worker(job_r: int, control_r: int, result_w: int) -> _Forked:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        from . import _worker

        _worker.after_fork(job_r, control_r, result_w)
    return _Forked(pid)


def check_platform(what: str) -> None:
    if sys.platform == "win32":
        raise NotImplementedError(
            f'{what}: backend="process" needs process groups and POSIX signals, which '
            'Windows lacks; use backend="thread" there'
        )


def dumps_job(func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
    """Pickle a job for a worker, or raise a TypeError that names what cannot travel."""
    import cloudpickle

    try:
        return cloudpickle.dumps((func, args), protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return,unused-ignore]
    except Exception as exc:
        error = exc
    for index, arg in enumerate(args, 1):
        try:
            cloudpickle.dumps(arg)
        except Exception as exc:
            raise TypeError(
                f"argument {index} to {name} ({type(arg).__qualname__} {arg!r:.60}) cannot "
                f'be pickled for backend="process": {exc}. Pass a picklable value, or run '
                'it with backend="thread"'
            ) from None
    raise TypeError(
        f'{name} cannot be pickled for backend="process": {error}. Use a function that '
        "can be pickled (cloudpickle handles lambdas and closures, but not what they "
        'capture if that cannot be pickled), or backend="thread"'
    ) from None


class WorkerProcess:
    """One worker process and the pipes to it.

    Its answers are read by the event loop itself (asyncio's add_reader, a trio system
    task): one thread hop fewer per call than a reader thread would cost.
    """

    def __init__(self, pool: ProcessPool) -> None:
        self.pool = pool
        self.link = pool.link
        self.lock = threading.Lock()
        self.current: ProcessWork | None = None
        self.killed = False
        self.used = False
        self.finished = False
        self.status = "starting"
        self.idle_since = time.monotonic()
        self.parser = _wire.FrameParser()
        job_r, self.job_fd = os.pipe()
        control_r, self.control_fd = os.pipe()
        self.result_fd, result_w = os.pipe()
        try:
            self.proc: subprocess.Popen[bytes] | _Forked
            if _start_method == "fork":
                self.proc = _fork_worker(job_r, control_r, result_w)
            else:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, str(job_r), str(control_r), str(result_w)],
                    pass_fds=(job_r, control_r, result_w),
                    start_new_session=True,  # leads its own process group
                    stdin=subprocess.DEVNULL,
                )
        except BaseException:
            for fd in (self.job_fd, self.control_fd, self.result_fd):
                os.close(fd)
            raise
        finally:
            for fd in (job_r, control_r, result_w):
                os.close(fd)
        self.pid = self.proc.pid
        os.set_blocking(self.result_fd, False)
        settings = {"sys_path": list(sys.path)}
        _wire.write_frame(self.job_fd, _wire.INIT, 0, pickle.dumps(settings))
        self.link.post(self._watch)

    # --- talking to the worker ---------------------------------------------------------

    def run(self, work: ProcessWork, payload: bytes) -> None:
        with self.lock:
            self.current = work
            self.used = True
        if len(payload) <= _INLINE_WRITE:
            self._write_job(work.job_id, payload)
        else:
            threading.Thread(
                target=self._write_job,
                args=(work.job_id, payload),
                name="threadbridge-write",
                daemon=True,
            ).start()

    def _write_job(self, job_id: int, payload: bytes) -> None:
        try:
            _wire.write_frame(self.job_fd, _wire.RUN, job_id, payload)
        except OSError:
            pass  # the worker has died; end of file on its results reports it

    def control(self, kind: int, job_id: int) -> None:
        try:
            _wire.write_frame(self.control_fd, kind, job_id)
        except OSError:
            pass

    def ask_to_exit(self) -> None:
        try:
            _wire.write_frame(self.job_fd, _wire.EXIT)
        except OSError:
            pass

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def exited(self) -> bool:
        """Whether the worker process has ended, without reaping it (lock-free)."""
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:
            return True  # reaped already

    def kill(self) -> None:
        """SIGKILL the worker's whole process group and reap the worker."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait()

    # --- reading answers, in the event loop ---------------------------------------------

    def _watch(self) -> None:
        if self.finished:
            return
        if self.link.name == "asyncio":
            self.link.loop.add_reader(self.result_fd, self._on_readable)
        else:
            import trio

            trio.lowlevel.spawn_system_task(self._trio_reader, name="threadbridge worker reader")

    def _unwatch(self) -> None:
        """Stop reading (in the loop's thread, or after the loop has gone)."""
        try:
            if self.link.name == "asyncio":
                self.link.loop.remove_reader(self.result_fd)
            else:
                import trio

                trio.lowlevel.notify_closing(self.result_fd)
        except (RuntimeError, ValueError, OSError):
            pass  # the loop has closed

    def _read_available(self) -> bytes | None:
        """What the pipe holds now: b"" at end of file, None if nothing yet."""
        try:
            return os.read(self.result_fd, 1 << 20)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _on_readable(self) -> None:
        data = self._read_available()
        if data is not None:
            self._feed(data)

    async def _trio_reader(self) -> None:
        import trio

        try:
            while True:
                await trio.lowlevel.wait_readable(self.result_fd)
                data = self._read_available()
                if data is not None:
                    self._feed(data)
                    if not data:
                        return
        except trio.ClosedResourceError:
            return  # shut down by the pool

    def _feed(self, data: bytes) -> None:
        if not data:
            # End of file: the worker has exited or been killed. Reaping may block for
            # a moment, so it happens in a thread.
            if self.link.name == "asyncio":
                self.link.loop.remove_reader(self.result_fd)
            threading.Thread(target=self._finish, name="threadbridge-reap", daemon=True).start()
            return
        for kind, job_id, payload in self.parser.feed(data):
            if kind != _wire.RESULT:
                continue
            with self.lock:
                work = self.current
                if work is None or work.job_id != job_id:
                    continue  # killed meanwhile: the ladder has reported it
                self.current = None
            self.pool._returned(self)
            work._finished(payload, in_loop=True)

    def _finish(self) -> None:
        """The worker is gone or going: clean up once. Any thread; the loop no longer reads."""
        with self.lock:
            if self.finished:
                return
            self.finished = True
            work = self.current
            self.current = None
        # Take down anything its targets left in its process group, while the unreaped
        # worker still holds the group's id (so that it cannot have been reused)...
        self.signal_group(signal.SIGKILL)
        returncode = self.proc.wait()  # ...then reap it: never a zombie
        for fd in (self.job_fd, self.control_fd, self.result_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pool._died(self)
        if work is not None:
            work._crashed(returncode)


class ProcessPool:
    """The workers of one event loop.

    Each worker's ``status`` ("idle", "busy", "retiring") changes only under ``lock``,
    together with the counters that stats() reports.
    """

    def __init__(self, link: Any) -> None:
        self.link = link
        self.lock = threading.Lock()
        self.idle: list[WorkerProcess] = []
        self.workers: set[WorkerProcess] = set()
        self.closed = False
        self.retire_scheduled = False
        _all_pools.add(self)

    def acquire(self) -> WorkerProcess:
        with self.lock:
            if self.closed:
                raise RuntimeError("the event loop is shutting down; no new process work")
            worker = self.idle.pop() if self.idle else None
            # Skip a worker that has died while idle (OOM killer, a kill from outside)
            # and whose end of file the loop has not read yet: it would fail the call.
            while worker is not None and worker.exited():
                worker.status = "dead"
                COUNTERS.add(idle_workers=-1, standby_workers=-(not worker.used))
                worker = self.idle.pop() if self.idle else None
            if worker is not None:
                worker.status = "busy"
                COUNTERS.add(busy_workers=1, idle_workers=-1, standby_workers=-(not worker.used))
            want_standby = not self.idle
        if worker is None:
            worker = self._new_worker("busy")
        if want_standby:
            threading.Thread(
                target=self._add_standby, name="threadbridge-standby", daemon=True
            ).start()
        return worker

    def _new_worker(self, status: str) -> WorkerProcess:
        worker = WorkerProcess(self)
        with self.lock:
            self.workers.add(worker)
            closed = self.closed
            if closed:  # the loop ended while it started
                worker.status = "retiring"
            elif status == "busy":
                worker.status = "busy"
                COUNTERS.add(busy_workers=1)
            else:
                worker.status = "idle"
                self.idle.insert(0, worker)
                COUNTERS.add(idle_workers=1, standby_workers=1)
        if closed:
            # shutdown() did not see it: end it here, the same way.
            worker.ask_to_exit()
            try:
                worker.proc.wait(timeout=SHUTDOWN_GRACE)
            except subprocess.TimeoutExpired:
                worker.kill()
            worker._finish()
            raise RuntimeError("the event loop is shutting down; no new process work")
        return worker

    def _add_standby(self) -> None:
        with self.lock:
            if self.closed or self.idle:
                return
        try:
            self._new_worker("idle")
        except RuntimeError:
            pass  # the loop ended meanwhile
        except OSError:  # pragma: no cover - out of processes or descriptors
            logger.exception("threadbridge: could not start a standby worker")

    def _returned(self, worker: WorkerProcess) -> None:
        """A worker finished a job and is free again."""
        worker.idle_since = time.monotonic()
        with self.lock:
            if self.closed:
                worker.status = "retiring"
            else:
                worker.status = "idle"
                self.idle.append(worker)
            with COUNTERS.lock:
                COUNTERS.busy_workers -= 1
                if not self.closed:
                    COUNTERS.idle_workers += 1
                COUNTERS.wake()
            closed = self.closed
            schedule = not closed and not self.retire_scheduled
            self.retire_scheduled = self.retire_scheduled or schedule
        if closed:
            worker.ask_to_exit()
        elif schedule:
            SCHEDULER.call_later(IDLE_TIMEOUT, self._retire_idle)

    def _retire_idle(self) -> None:
        """Let workers idle for IDLE_TIMEOUT exit; the most recently used one stays."""
        now = time.monotonic()
        with self.lock:
            self.retire_scheduled = False
            if self.closed:
                return
            keep = self.idle[-1:]  # the standby
            old = [w for w in self.idle[:-1] if now - w.idle_since >= IDLE_TIMEOUT]
            for worker in old:
                self.idle.remove(worker)
                worker.status = "retiring"
                COUNTERS.add(idle_workers=-1, standby_workers=-(not worker.used))
            rest = [w for w in self.idle if w not in keep]
            if rest:
                self.retire_scheduled = True
                delay = IDLE_TIMEOUT - (now - min(w.idle_since for w in rest))
        for worker in old:
            worker.ask_to_exit()
        if rest:
            SCHEDULER.call_later(max(delay, 0.0), self._retire_idle)

    def _killed(self, worker: WorkerProcess) -> None:
        """Rung 3 killed and reaped a busy worker: count it out before the await returns
        (the loop reads its end of file, and _died() runs, a little later)."""
        with self.lock:
            if worker.status == "busy":
                worker.status = "dead"
                with COUNTERS.lock:
                    COUNTERS.busy_workers -= 1
                    COUNTERS.wake()

    def _died(self, worker: WorkerProcess) -> None:
        """A worker process has exited and been reaped (reader thread)."""
        with self.lock:
            self.workers.discard(worker)
            if worker.status == "idle":
                self.idle.remove(worker)
                COUNTERS.add(idle_workers=-1, standby_workers=-(not worker.used))
            elif worker.status == "busy":
                COUNTERS.add(busy_workers=-1)
            worker.status = "gone"  # from "retiring" or "dead", nothing to count
            replace = not self.closed and not self.idle
        if replace:
            self._add_standby()

    def shutdown(self) -> None:
        """End every worker: ask, wait up to SHUTDOWN_GRACE, then SIGKILL. Blocks."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            workers = list(self.workers)
        for worker in workers:
            worker.ask_to_exit()
            if worker.current is not None:
                worker.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for worker in workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
            # The loop will not read again (it is ending, or gone): clean up here.
            worker._unwatch()
            worker._finish()


_all_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()
_pools: weakref.WeakKeyDictionary[object, ProcessPool] = weakref.WeakKeyDictionary()
_background: set[Any] = set()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_all_pools):
        pool.shutdown()


def pool_for(link: Any) -> ProcessPool:
    """The pool of the running loop; made, with its shutdown guard, on first use."""
    key = link.key
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = ProcessPool(link)
        _guard(link, pool)
    return pool


def _guard(link: Any, pool: ProcessPool) -> None:
    """Shut the pool down when the loop ends: a task that waits until it is cancelled."""
    if link.name == "asyncio":
        loop = link.loop

        async def asyncio_guard() -> None:
            try:
                await loop.create_future()
            finally:
                pool.shutdown()

        task = loop.create_task(asyncio_guard(), name="threadbridge process pool guard")
        _background.add(task)
        task.add_done_callback(_background.discard)
    else:
        import trio

        async def trio_guard() -> None:
            try:
                await trio.sleep_forever()
            finally:
                pool.shutdown()

        trio.lowlevel.spawn_system_task(trio_guard, name="threadbridge process pool guard")


_job_ids = iter(range(1, 1 << 63))


class ProcessWork:
    """One target in one worker process; the ladder's Work for the process backend."""

    __slots__ = ("handle", "job_id", "worker")

    def __init__(self, handle: Handle[Any], worker: WorkerProcess) -> None:
        self.handle = handle
        self.worker = worker
        self.job_id = next(_job_ids)

    def request_stop(self) -> None:
        self.worker.control(_wire.CANCEL, self.job_id)

    def interrupt(self) -> bool:
        worker = self.worker
        with worker.lock:
            if worker.current is not self:
                return False
        worker.control(_wire.INTERRUPT, self.job_id)
        return True

    def force(self) -> None:
        worker = self.worker
        with worker.lock:
            if worker.current is not self:
                return  # it has just ended; the reader reports it
            worker.current = None
            worker.killed = True
        worker.kill()
        worker.pool._killed(worker)
        logger.warning(
            "threadbridge: killed the worker process (pid %d) running %s and its process "
            "group (rung 3): it did not stop within its grace periods",
            worker.pid,
            self.describe(),
        )
        self._ended()
        self.handle._settle(Stage.KILLED, None, released=True)

    def describe(self) -> str:
        return self.handle.name

    def describe_running(self) -> str:
        return f"worker process {self.worker.pid} running {self.describe()}"

    def _ended(self) -> None:
        with COUNTERS.lock:
            COUNTERS.running.pop(id(self), None)

    def _finished(self, payload: bytes, *, in_loop: bool) -> None:
        try:
            kind, value, flag = pickle.loads(payload)
        except Exception as exc:
            kind, flag = "raise", 0
            value = TypeError(
                f"the worker's answer for {self.describe()} cannot be unpickled: {exc}"
            )
        stage = (Stage.FINISHED, Stage.COOPERATIVE, Stage.INTERRUPTED)[flag]
        self._ended()
        self.handle._settle(stage, (kind == "return", value), released=True, in_loop=in_loop)

    def _crashed(self, returncode: int) -> None:
        if returncode < 0:
            signum = -returncode
            try:
                signame = signal.Signals(signum).name
            except ValueError:  # pragma: no cover
                signame = str(signum)
            error = WorkerCrashed(
                f"the worker process running {self.describe()} was killed by {signame}",
                signal=signum,
            )
        else:
            error = WorkerCrashed(
                f"the worker process running {self.describe()} exited with code "
                f"{returncode} without answering",
                exitcode=returncode,
            )
        rung = self.handle._rung
        stage = Stage.INTERRUPTED if rung >= 2 else Stage.COOPERATIVE if rung else Stage.FINISHED
        self._ended()
        self.handle._settle(stage, (False, error), released=True)


def start(handle: Handle[Any], link: Any, payload: bytes) -> None:
    worker = pool_for(link).acquire()
    work = ProcessWork(handle, worker)
    with COUNTERS.lock:
        COUNTERS.running[id(work)] = work
    handle._start(work)
    worker.run(work, payload)
