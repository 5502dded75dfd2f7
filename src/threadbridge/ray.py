"""Run targets as Ray tasks, with the same ladder: ``backend="ray"`` or ``RayBackend()``.

Needs the ``ray`` extra (``pip install "threadbridge[ray]"``); ``import threadbridge``
never imports Ray. The work runs on the cluster the program is connected to
(``ray.init()``, ``RAY_ADDRESS``), or on a local one that the first call starts, as Ray
itself does. The rungs:

* rung 1 sets the token that the remote target sees (``check_cancelled()``,
  ``cancel_requested()``, ``sleep()``, ``current_token()`` work inside the task), through
  a small control actor that a thread of the task listens to; a task still waiting for
  cluster resources is cancelled by Ray and never starts;
* rung 2 raises ``TargetCancelled`` inside the remote target: a signal to the task's own
  thread, so that it lands inside ``time.sleep()`` and other calls a signal interrupts;
* rung 3 is ``ray.cancel(ref, force=True)``: Ray kills the worker process (and what the
  target started), and the handle ends KILLED.

The await returns once Ray reports the task ended.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import FrameType
from typing import Any

from . import _pickling, _stats
from ._backend import Backend
from ._errors import TargetCancelled, WorkerCrashed
from ._ladder import Ending, Run
from ._scheduler import SCHEDULER
from ._target import Outcome, TargetState, resend_delays
from ._token import Token


def _unavailable(what: str) -> NotImplementedError | None:
    if sys.platform == "win32" or not hasattr(signal, "pthread_kill"):
        return NotImplementedError(
            f'{what}: backend="ray" delivers rung 2 with POSIX signals, which this '
            "platform lacks (Windows has none); run the driver and the cluster on "
            "Linux or macOS"
        )
    return None


try:
    # Through importlib: Ray's own type hints are partial; here it is typed as Any.
    ray: Any = importlib.import_module("ray")
    importlib.import_module("ray.exceptions")
    importlib.import_module("ray.util.scheduling_strategies")
except ImportError as exc:  # pragma: no cover - tested by a subprocess without Ray
    # Where the backend could not work anyway, that is what to say, not "install Ray".
    refusal = _unavailable("threadbridge.ray")
    if refusal is not None:
        raise refusal from None
    raise ImportError(
        'threadbridge.ray needs Ray: install it with pip install "threadbridge[ray]"'
    ) from exc


logger = logging.getLogger("threadbridge")

__all__ = ["RayBackend"]

# The signal that carries rung 2 to the task's thread. Ray leaves it alone; its default
# action would end the worker, so the handler, once installed, stays (it does nothing
# when no threadbridge target runs).
# Windows has none; check_platform() refuses it before anything would use it.
_RUNG2_SIGNAL: int = getattr(signal, "SIGUSR2", 0)
_STOP, _INTERRUPT, _GONE = 1, 2, -1
_WAIT = 5.0  # seconds a watcher's wait on the control actor lasts before it asks again
# A task's watcher tells the control actor where the task runs after _PLACE_DELAY, and
# first waits on it after _QUIET_START (both at once when Ray's own cancel reaches the
# task): a short task costs no actor call at all. A target that waits in sleep() within
# _QUIET_START sees rung 1 at most this late.
_PLACE_DELAY = 0.002
_QUIET_START = 0.02


# --- the control actor: how rungs 1 and 2 reach a running task ---------------------------


class _Control:
    """One per driver: the rung each job has reached, awaited by the jobs' watchers, and
    where each job's task runs, for rung 3."""

    def __init__(self) -> None:
        self.levels: dict[int, int] = {}
        self.changed: dict[int, asyncio.Event] = {}
        self.places: dict[int, tuple[int, str]] = {}
        self.placed: dict[int, asyncio.Event] = {}

    def _event(self, job: int) -> asyncio.Event:
        event = self.changed.get(job)
        if event is None:
            event = self.changed[job] = asyncio.Event()
        return event

    async def wait(self, job: int, seen: int, timeout: float) -> int:
        """The job's level once it differs from ``seen`` (or after ``timeout``)."""
        event = self._event(job)
        if self.levels.get(job, 0) == seen:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.levels.get(job, 0)

    async def set(self, job: int, level: int) -> None:
        if job in self.levels and self.levels[job] == _GONE:
            return
        self.levels[job] = max(level, self.levels.get(job, 0)) if level > 0 else level
        event = self._event(job)
        event.set()
        self.changed[job] = asyncio.Event()  # later waiters wait for the next change
        if level == _GONE:
            self._forget_later(job)

    def started(self, job: int, place: tuple[int, str]) -> None:
        """The job's task has started in this worker process (pid, node id)."""
        self.places[job] = place
        event = self.placed.pop(job, None)
        if event is not None:
            event.set()
        if self.levels.get(job) == _GONE:
            self._forget_later(job)  # word of the start came after word of the end

    async def where(self, job: int, timeout: float) -> tuple[int, str] | None:
        """The worker process (pid, node id) that runs or ran the job. Word of it is sent
        as the task starts: it is waited for up to ``timeout``, as it may still be on
        its way when the driver asks (a task killed as soon as it started)."""
        if job not in self.places:
            event = self.placed.setdefault(job, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                self.placed.pop(job, None)
        return self.places.get(job)

    def _forget_later(self, job: int) -> None:
        # Soon, not now: a late rung for an ended job finds it gone, not new.
        asyncio.get_running_loop().call_later(60, self._forget, job)

    def _forget(self, job: int) -> None:
        self.levels.pop(job, None)
        self.changed.pop(job, None)
        self.places.pop(job, None)
        self.placed.pop(job, None)


_control_lock = threading.Lock()
_control_handle: Any = None
_control_name = ""
_task_function: Any = None


def _control() -> tuple[Any, str]:
    """The driver's control actor, and its name (tasks find it by name: a name is
    cheaper to send with every task than a handle)."""
    global _control_handle, _control_name
    with _control_lock:
        if _control_handle is None:
            name = f"threadbridge-control-{uuid.uuid4().hex}"
            actor = ray.remote(num_cpus=0, max_concurrency=10_000)(_Control)
            _control_handle = actor.options(name=name).remote()
            _control_name = name
        return _control_handle, _control_name


_found: dict[str, Any] = {}  # in a Ray worker: control actors by name


def _find_control(name: str) -> Any:
    handle = _found.get(name)
    if handle is None:
        handle = _found[name] = ray.get_actor(name)
    return handle


def _task() -> Any:
    global _task_function
    if _task_function is None:
        _task_function = ray.remote(_run_remote)
    return _task_function


# --- inside the Ray task --------------------------------------------------------------------


class _RemoteJob:
    __slots__ = (
        "control",
        "ended",
        "heard",
        "id",
        "interrupt_requested",
        "state",
        "thread_id",
        "wake",
    )

    def __init__(self, control: str, job_id: int, state: TargetState) -> None:
        self.control = control  # the control actor's name
        self.id = job_id
        self.state = state
        self.wake = threading.Event()  # Ray's own cancel arrived: the watcher starts now
        self.ended = threading.Event()  # the target has returned (or never will start)
        self.interrupt_requested = False
        self.heard = False  # the rung-2 handler has run since rung 2 was requested
        self.thread_id = threading.get_ident()


_current: _RemoteJob | None = None
_previous_sigint: Any = None
_installed = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Ray's own cancel (``ray.cancel(ref)``) raises KeyboardInterrupt in the task through
    the SIGINT handler: for a threadbridge target that is rung 1, never an exception."""
    job = _current
    if job is not None:
        # The handler runs in the task's thread, between any two bytecodes: perhaps
        # while that thread holds a lock that setting the token (or an Event) takes,
        # inside Token.wait() or sleep(). So it takes none: SimpleQueue.put() is safe
        # here, and the relay thread sets the token.
        _relayed.put(job)
        return
    previous = _previous_sigint
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt


def _on_rung2(signum: int, frame: FrameType | None) -> None:
    job = _current
    if job is not None and job.interrupt_requested:
        job.heard = True
        job.state.interrupt_here("interrupted (rung 2, in a Ray task)")


_relayed: queue.SimpleQueue[_RemoteJob] = queue.SimpleQueue()


def _relay() -> None:
    """Rung 1 from Ray's own cancel, set outside the signal handler (see _on_sigint)."""
    while True:
        job = _relayed.get()
        job.state.token._set()
        job.wake.set()  # its watcher starts now, if it has not yet


def _install_handlers() -> None:
    global _installed, _previous_sigint
    if not _installed:
        threading.Thread(target=_relay, name="threadbridge-ray-rung1", daemon=True).start()
        _previous_sigint = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, _on_sigint)
        signal.signal(_RUNG2_SIGNAL, _on_rung2)
        _installed = True


# One watcher thread per Ray worker process, for the job it runs now (Ray runs one task at
# a time in a worker): starting a thread per task would cost more than the task.
_watcher_jobs: queue.SimpleQueue[_RemoteJob] = queue.SimpleQueue()
_watcher_lock = threading.Lock()
_watcher: threading.Thread | None = None


def _hand_to_watcher(job: _RemoteJob) -> None:
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = threading.Thread(
                target=_watch_jobs, name="threadbridge-ray-watcher", daemon=True
            )
            _watcher.start()
    _watcher_jobs.put(job)


def _watch_jobs() -> None:
    while True:
        job = _watcher_jobs.get()
        try:
            _watch(job.control, job)
        except Exception:  # pragma: no cover - never let the watcher die
            logger.exception("threadbridge's Ray watcher failed")


def _watch(name: str, job: _RemoteJob) -> None:
    """Listen for the job's rungs on the control actor (in the watcher thread)."""
    job.wake.wait(_PLACE_DELAY)
    if job.ended.is_set():
        return  # a short task: no actor call at all
    try:
        control = _find_control(name)
        # Where the task runs, for rung 3 to wait until this process is gone. Sent
        # early, without waiting for an answer: a task may be killed long before its
        # watcher would first wait on the actor.
        control.started.remote(job.id, (os.getpid(), ray.get_runtime_context().get_node_id()))
    except Exception:  # the driver is gone, and its actor
        return
    job.wake.wait(_QUIET_START - _PLACE_DELAY)
    seen = 0
    while not job.ended.is_set():
        try:
            level = ray.get(control.wait.remote(job.id, seen, _WAIT))
        except Exception:  # the driver is gone, or the actor: the task will be too
            return
        if level == _GONE or job.ended.is_set():
            return
        if level >= _STOP:
            job.state.token._set()
        if level >= _INTERRUPT and not job.interrupt_requested:
            job.interrupt_requested = True
            with job.state.lock:
                running = job.state.running and not job.state.interrupted
            if running:
                signal.pthread_kill(job.thread_id, _RUNG2_SIGNAL)
                _send_again_until_heard(job)
        seen = level


def _send_again_until_heard(job: _RemoteJob) -> None:
    """Rung 2's signal to the task's thread again until its handler has run (see
    RESEND_FIRST), the task has ended, or the target has put a handler of its own."""
    for delay in resend_delays():
        if job.ended.wait(delay):
            return
        with job.state.lock:
            unheard = job.state.running and not job.heard
        if not unheard or signal.getsignal(_RUNG2_SIGNAL) is not _on_rung2:
            return
        signal.pthread_kill(job.thread_id, _RUNG2_SIGNAL)


def _run_remote(control: str, job_id: int, payload: bytes) -> bytes:
    """The Ray task: run one target under its token; answer as a worker process does."""
    global _current
    _install_handlers()
    state = TargetState(Token(), threading.Lock())
    job = _RemoteJob(control, job_id, state)

    def call() -> Outcome:
        try:
            func, args = ray.cloudpickle.loads(payload)
        except TargetCancelled:
            raise
        except BaseException as exc:
            note = f"the Ray task could not unpickle the target or its arguments: {exc}"
            return (False, _pickling.remote_error(exc, note))
        try:
            return (True, func(*args))
        except BaseException as exc:
            return (False, exc)

    _current = job
    try:
        _hand_to_watcher(job)
        outcome = state.run(call)
    finally:
        job.ended.set()
        job.wake.set()
        _current = None  # the driver ends the watcher's wait (no actor call from here)
    if outcome is None:
        return _pickling.dumps_answer(_pickling.NOT_STARTED, None, state.interrupted)
    ok, value = outcome
    how = _pickling.RETURNED if ok else _pickling.RAISED
    return _pickling.dumps_answer(how, value, state.interrupted)


def _wait_gone(pid: int, timeout: float) -> bool:
    """On the node of a killed worker: wait until its process is gone (a zombie counts)."""
    deadline = time.monotonic() + timeout
    while not _process_gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # pragma: no cover - no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


# --- in the driver --------------------------------------------------------------------------

REAP_TIMEOUT = 5.0  # how long a killed worker may take to be gone before it is logged
FORCE_REPEAT = 0.1  # rung 3's cancel is repeated this often until Ray reports the end
PLACE_TIMEOUT = 5.0  # how long rung 3 waits for word of where a task that just started runs

_job_ids = itertools.count(1)


class _Tasks:
    """The Ray tasks in flight, as a stats() source."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.works: set[RayWork] = set()

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"remote_tasks": len(self.works)}

    def describe_running(self) -> list[str]:
        with self.lock:
            return [work.describe() for work in self.works]


_tasks = _Tasks()
_stats.register(_tasks)


class RayWork:
    """One target as one Ray task; the ladder's Work for the Ray backend."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.job_id = next(_job_ids)
        self.ref: Any = None
        self.forced = False
        self.ended = False  # Ray has reported the task's end
        self.lock = threading.Lock()
        self.control, self.control_name = _control()

    def submit(self, options: Mapping[str, Any], payload: bytes) -> None:
        with _tasks.lock:
            _tasks.works.add(self)
        try:
            task = _task().options(**options)
            self.ref = task.remote(self.control_name, self.job_id, payload)
        except BaseException:
            with _tasks.lock:
                _tasks.works.discard(self)
            # Nothing was submitted; the run is attached, so its end is ours to report.
            self.run.report(Ending.NOT_STARTED)
            raise
        future: Future[bytes] = self.ref.future()
        future.add_done_callback(self._ended)

    # --- the rungs ---------------------------------------------------------------------

    def request_stop(self) -> None:
        self.control.set.remote(self.job_id, _STOP)
        # A task still waiting for resources never starts; a running one gets its own
        # SIGINT handler called, which sets the token too.
        self._cancel(force=False)

    def interrupt(self) -> bool:
        self.control.set.remote(self.job_id, _INTERRUPT)
        return True

    def force(self) -> None:
        self.forced = True
        if not self._cancel(force=True):
            return
        logger.warning(
            "killed the Ray worker running %s (rung 3): it did not stop within its grace periods",
            self.run.name,
        )
        # Ray drops a cancel that comes while an earlier one for the same task is still in
        # flight (rung 1's, whose reply is slow on a busy machine), and does not retry it:
        # rung 3's is repeated until Ray reports the task's end.
        SCHEDULER.call_later(FORCE_REPEAT, self._force_again)

    def _force_again(self) -> None:
        if self._cancel(force=True):
            SCHEDULER.call_later(FORCE_REPEAT, self._force_again)

    def _cancel(self, *, force: bool) -> bool:
        """ray.cancel() for the task, unless Ray has reported its end. Returns whether
        it was asked."""
        with self.lock:  # the end is not reported while this runs (see _ended)
            if self.ended:
                return False
            try:
                ray.cancel(self.ref, force=force)
            except Exception:  # it has just ended, or the cluster is going
                logger.debug("ray.cancel for %s failed", self.run.name, exc_info=True)
                return False
        return True

    def describe(self) -> str:
        return f"Ray task running {self.run.name}"

    # --- the end -------------------------------------------------------------------------

    def _killed(self) -> None:
        """After rung 3: wait until the worker process is gone, then report KILLED."""
        try:
            ask = self.control.where.remote(self.job_id, PLACE_TIMEOUT)
            place = ray.get(ask, timeout=PLACE_TIMEOUT + REAP_TIMEOUT)
            if place is not None:
                pid, node = place
                if node == ray.get_runtime_context().get_node_id():
                    gone = _wait_gone(pid, REAP_TIMEOUT)
                else:
                    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                        node, soft=False
                    )
                    check = ray.remote(_wait_gone).options(
                        num_cpus=0, scheduling_strategy=strategy, max_retries=0
                    )
                    gone = ray.get(check.remote(pid, REAP_TIMEOUT))
                if not gone:
                    logger.error(
                        "the Ray worker (pid %d) killed at rung 3 for %s was still there %ss later",
                        pid,
                        self.run.name,
                        REAP_TIMEOUT,
                    )
        except Exception:  # the node or the actor is gone: so is the worker
            logger.debug("could not check that a killed Ray worker is gone", exc_info=True)
        finally:
            self.run.report(Ending.KILLED)

    def _ended(self, future: Future[bytes]) -> None:
        """Ray reports the task ended (in one of Ray's threads)."""
        with self.lock:  # a cancel under way finishes first
            self.ended = True
            # The task's ObjectRef goes now, while Ray runs: the last reference to this
            # work may be dropped anywhere later (a timer of the ladder's), perhaps after
            # ray.shutdown(), and an ObjectRef freed then ends the whole process.
            self.ref = None
        with _tasks.lock:
            _tasks.works.discard(self)
        # Ends its watcher's wait, if one waits. Before the report, as everything that
        # uses Ray: once the caller has its answer it may call ray.shutdown(), and Ray
        # ends the whole process when it is used after that.
        try:
            self.control.set.remote(self.job_id, _GONE)
        except Exception:  # the cluster is going: so is the watcher
            logger.debug("could not tell the watcher of %s", self.run.name, exc_info=True)
        self._report(future)

    def _report(self, future: Future[bytes]) -> None:
        _stats.changed()
        try:
            data = future.result()
        except ray.exceptions.TaskCancelledError:
            if self.forced:
                # Ray reports the cancel before the worker process is gone: the await
                # must not return while the target may still run.
                threading.Thread(
                    target=self._killed, name="threadbridge-ray-reap", daemon=True
                ).start()
            else:
                self.run.report(Ending.NOT_STARTED)
            return
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as exc:
            if self.forced:
                threading.Thread(
                    target=self._killed, name="threadbridge-ray-reap", daemon=True
                ).start()
                return
            crashed = WorkerCrashed(f"the Ray worker running {self.run.name} died: {exc}")
            self.run.report(Ending.ENDED, (False, crashed), interrupted=False)
            return
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            self.run.report(Ending.ENDED, (False, cause), interrupted=False)
            return
        except BaseException as exc:
            self.run.report(Ending.ENDED, (False, exc), interrupted=False)
            return
        how, value, interrupted = _pickling.loads_answer(data, self.run.name)
        if how == _pickling.NOT_STARTED:
            self.run.report(Ending.NOT_STARTED)
        else:
            outcome = (how == _pickling.RETURNED, value)
            self.run.report(Ending.ENDED, outcome, interrupted=interrupted)


_guarded: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def _guard_loop(run: Run) -> None:
    """When the run's event loop ends, its Ray tasks still running climb their ladders
    (nothing may be left running on the cluster for a program that moved on)."""
    link = run.link
    key = link.key
    if key in _guarded:
        return
    _guarded[key] = True

    def loop_closing() -> None:
        with _tasks.lock:
            works = [work for work in _tasks.works if work.run.link.key is key]
        for work in works:
            work.run.cancel()

    link.on_close(loop_closing, "threadbridge Ray tasks guard")


def _ensure_ray() -> None:
    if not ray.is_initialized():
        # Connects to RAY_ADDRESS, or starts a local cluster, as Ray's first call would.
        ray.init(include_dashboard=False, log_to_driver=True)


class RayBackend(Backend):
    """Run targets as Ray tasks, with the same ladder.

        await threadbridge.run_killable(train, data, backend=RayBackend(num_cpus=4))
        await threadbridge.run_killable(f, x, backend="ray")  # RayBackend()

    Args:
        num_cpus: CPUs each task reserves on the cluster.
        resources: other custom resources each task reserves, as for ``ray.remote``.
        runtime_env: the task's runtime environment, as for ``ray.remote``; the nodes
            need threadbridge installed (``{"pip": ["threadbridge"]}``).
        **options: any other option of ``.options()`` of a Ray task (``memory``,
            ``num_gpus``, ``scheduling_strategy``...). ``max_retries`` is always 0: a
            stopped task must not run again.

    The default limiter of a ``RayBackend`` allows as many calls at once as the cluster
    has CPUs for (measured on first use).
    """

    name = "ray"

    def __init__(
        self,
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or num_cpus < 0:
            raise ValueError(f"RayBackend: num_cpus must be a number >= 0, got {num_cpus!r}")
        if "max_retries" in options or "retry_exceptions" in options:
            raise ValueError(
                "RayBackend: max_retries and retry_exceptions are always off (a stopped "
                "task must not run again)"
            )
        self.options: dict[str, Any] = {
            **options,
            "num_cpus": num_cpus,
            "max_retries": 0,
            "retry_exceptions": False,
        }
        if resources is not None:
            self.options["resources"] = dict(resources)
        if runtime_env is not None:
            self.options["runtime_env"] = dict(runtime_env)
        self.num_cpus = num_cpus

    def __repr__(self) -> str:
        return f"RayBackend(num_cpus={self.num_cpus!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RayBackend) and other.options == self.options

    def __hash__(self) -> int:
        return hash(("RayBackend", self.num_cpus, repr(sorted(self.options.items()))))

    def check_platform(self, what: str) -> None:
        refusal = _unavailable(what)
        if refusal is not None:
            raise refusal
        _ensure_ray()

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
        dumps = ray.cloudpickle.dumps
        try:
            return dumps((func, args))  # type: ignore[no-any-return]
        except Exception as exc:
            error = exc
        for index, arg in enumerate(args, 1):
            try:
                dumps(arg)
            except Exception as exc:
                raise TypeError(
                    f"argument {index} to {name} ({type(arg).__qualname__} {arg!r:.60}) "
                    f'cannot be serialized for backend="ray": {exc}. Pass a picklable value'
                ) from None
        raise TypeError(f'{name} cannot be serialized for backend="ray": {error}') from None

    def start(self, run: Run, job: Any) -> RayWork:
        _guard_loop(run)
        work = RayWork(run)
        run.attach(work)  # before the task is submitted: from here the ladder reaches it
        work.submit(self.options, job)
        return work

    def default_limit(self) -> int:
        _ensure_ray()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        per_task = self.num_cpus or 1
        return max(1, int(cpus // per_task))
