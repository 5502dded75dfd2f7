"""In the driver: one target as one Ray task, the ladder's Work for the Ray backend."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from .. import _locks, _otel, _pickling, _stats
from .._errors import WorkerCrashed
from .._ladder import Ending, Run
from .._scheduler import SCHEDULER
from .._where import line_of
from ._control import GONE, INTERRUPT, STOP, control
from ._lib import ray
from ._task import run_remote, wait_gone

logger = logging.getLogger("threadbridge")

REAP_TIMEOUT = 5.0  # how long a killed worker may take to be gone before it is logged
FORCE_REPEAT = 0.1  # rung 3's cancel is repeated this often until Ray reports the end
WHERE_TIMEOUT = 1.0  # how long RunningTarget.where() waits for the task's watcher to say
PLACE_TIMEOUT = 5.0  # how long rung 3 waits for word of where a task that just started runs
# How long rung 3 waits for the task's watcher to say where its target is, when rung 2 has
# not said it (Policy(interrupt=False)), before the kill; a little more if the control
# actor does not answer at all.
ASK_BEFORE_KILL = 0.5

_job_ids = itertools.count(1)
_task_function: Any = None


def _task() -> Any:
    global _task_function
    if _task_function is None:
        _task_function = ray.remote(run_remote)
    return _task_function


def _announce_if(answer: Future[bool], announce: Callable[[], None]) -> None:
    """The control actor's answer to rung 2: announce it if the task runs."""
    try:
        running = answer.result()
    except Exception:  # the actor is gone, and with it the driver's cluster
        return
    if running:
        announce()


class _Tasks:
    """The Ray tasks in flight, as a stats() source."""

    def __init__(self) -> None:
        self.lock = _locks.Lock()
        self.works: set[RayWork] = set()

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"remote_tasks": len(self.works)}

    def running(self) -> list[_stats.RunningTarget]:
        with self.lock:
            works = list(self.works)
        return [
            _stats.RunningTarget(
                work.run, "ray", work.started, None, None, work.where_now, work.describe()
            )
            for work in works
        ]


_tasks = _Tasks()
_stats.register(_tasks)


class RayWork:
    """One target as one Ray task; the ladder's Work for the Ray backend."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.job_id = next(_job_ids)
        self.ref: Any = None
        self.forced = False
        self.killing = False  # rung 3's cancel has been sent, or is being sent
        self.ended = False  # Ray has reported the task's end
        self.lock = _locks.Lock()
        self.control, self.control_name = control()
        self.started = time.monotonic()

    def submit(self, options: Mapping[str, Any], payload: bytes) -> None:
        with _tasks.lock:
            _tasks.works.add(self)
        try:
            task = _task().options(**options)
            span = self.run.span
            trace = None if span is None else _otel.carrier(span)
            self.ref = task.remote(self.control_name, self.job_id, payload, trace)
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
        self.control.set.remote(self.job_id, STOP)
        # A task still waiting for resources never starts; a running one gets its own
        # SIGINT handler called, which sets the token too.
        self._cancel(force=False)

    def interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        """Rung 2 through the control actor. Returns at once (the scheduler's thread
        times every call's rungs: no round trip to the cluster on it): whether the task
        was still in flight. The actor answers whether the task runs (its watcher has
        said it started); rung 2 is announced only then, as that answer comes."""
        with self.lock:
            if self.ended:
                return False
        try:
            ref = self.control.set.remote(self.job_id, INTERRUPT)
        except Exception:  # the cluster is going: so is the task
            logger.debug("rung 2 for %s could not be sent", self.run.name, exc_info=True)
            return False
        if announce is not None:
            # The closure keeps the reference until Ray has answered (in Ray's thread).
            ref.future().add_done_callback(lambda answer, ref=ref: _announce_if(answer, announce))
        return True

    def force(self) -> None:
        self.forced = True
        if self.run.where is None:
            # Where the target is, asked of its watcher first: the kill follows the answer.
            try:
                ref = self.control.ask_where.remote(self.job_id, ASK_BEFORE_KILL)
            except Exception:  # the cluster is going: so is the task
                logger.debug("could not ask where %s is", self.run.name, exc_info=True)
            else:
                ref.future().add_done_callback(lambda answer, ref=ref: self._told(answer))
                SCHEDULER.call_later(ASK_BEFORE_KILL + 0.5, self._kill)
                return
        self._kill()

    def _told(self, answer: Future[str | None]) -> None:
        """The watcher's answer to rung 3's question (in Ray's thread, where nothing is
        logged: the logging module would count it as a thread of Python's): kill now,
        from the scheduler's thread."""
        try:
            stack = answer.result()
        except Exception:  # the actor is gone
            stack = None
        if isinstance(stack, str) and self.run.where is None:
            line = line_of(stack)
            if line is not None:
                self.run.seen_at(line, stack)  # said by rung 3's record
        SCHEDULER.call_later(0.0, self._kill)

    def _kill(self) -> None:
        with self.lock:
            if self.killing:
                return  # the answer or its timer came first
            self.killing = True
        if not self._cancel(force=True, announce=self._say_killed):
            return
        # Ray drops a cancel that comes while an earlier one for the same task is still in
        # flight (rung 1's, whose reply is slow on a busy machine), and does not retry it:
        # rung 3's is repeated until Ray reports the task's end.
        SCHEDULER.call_later(FORCE_REPEAT, self._force_again)

    def _force_again(self) -> None:
        if self._cancel(force=True):
            SCHEDULER.call_later(FORCE_REPEAT, self._force_again)

    def _say_killed(self) -> None:
        logger.warning(
            "killed the Ray worker running %s (rung 3): it did not stop within its grace periods%s",
            self.run.name,
            self.run.said_where(),
            extra=self.run.fields("kill", self),
        )

    def _cancel(self, *, force: bool, announce: Callable[[], None] | None = None) -> bool:
        """ray.cancel() for the task, unless Ray has reported its end; ``announce`` is
        called first, if it is asked (what it says comes before the end is reported).
        Returns whether it was asked."""
        with self.lock:  # the end is not reported while this runs (see _ended)
            if self.ended:
                return False
            if announce is not None:
                announce()
            try:
                ray.cancel(self.ref, force=force)
            except Exception:  # it has just ended, or the cluster is going
                logger.debug("ray.cancel for %s failed", self.run.name, exc_info=True)
                return False
        return True

    backend = "ray"  # for the records of the ladder (Run.fields)
    pid = None  # the Ray worker's is known to its watcher, not here

    def describe(self) -> str:
        return f"Ray task running {self.run.name}"

    def where_now(self, timeout: float = WHERE_TIMEOUT) -> str:
        """For ``RunningTarget.where()``: asked of the task's watcher, through the
        control actor (which answers within ``timeout``)."""
        try:
            stack = ray.get(self.control.ask_where.remote(self.job_id, timeout))
        except Exception as exc:  # the cluster is going, and the task with it
            return f"(the control actor did not answer: {exc!r})"
        if stack is None:
            return (
                f"(the task did not say within {timeout}s: it may not run yet, have ended, "
                "or hold the GIL in one long C call)"
            )
        return str(stack)

    # --- the end -------------------------------------------------------------------------

    def _killed(self) -> None:
        """After rung 3: wait until the worker process is gone, then report KILLED."""
        try:
            # Where rung 2 found the target, as its watcher told the control actor at
            # once (a killed task sends no answer to carry it): stopped_at is there
            # once the kill is reported. Asked here, in this thread, while Ray runs.
            if self.run.where is None:
                where = ray.get(self.control.where_said.remote(self.job_id), timeout=5)
                if where is not None:
                    self.run.seen_late(str(where[0]), str(where[1]))
        except Exception:  # the actor is gone
            logger.debug("could not ask where %s was", self.run.name, exc_info=True)
        try:
            ask = self.control.where.remote(self.job_id, PLACE_TIMEOUT)
            place = ray.get(ask, timeout=PLACE_TIMEOUT + REAP_TIMEOUT)
            if place is not None:
                pid, node = place
                if node == ray.get_runtime_context().get_node_id():
                    gone = wait_gone(pid, REAP_TIMEOUT)
                else:
                    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                        node, soft=False
                    )
                    check = ray.remote(wait_gone).options(
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
            self.control.set.remote(self.job_id, GONE)
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
        answer = _pickling.loads_answer(data, self.run.name)
        del data
        self.run.report_answer(answer, hand_back=False)
        del answer  # the awaiter may drop the value at once, and expect it gone
        self.run.hand_back()


_guarded: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def guard_loop(run: Run) -> None:
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
            _stats.note_outlived(f"{work.describe()}: still running when its event loop ended")
            work.run.cancel()

    link.on_close(loop_closing, "threadbridge Ray tasks guard")


def ensure_ray() -> None:
    if not ray.is_initialized():
        # Connects to RAY_ADDRESS, or starts a local cluster, as Ray's first call would.
        ray.init(include_dashboard=False, log_to_driver=True)
