"""A remote backend in this very process, for collaboration tests of the target host.

What a remote backend supplies, and no more (docs/internals.md, "Adding a backend"): how
a job travels to the host (a queue), how rungs 1 and 2 arrive there (a direct call, as a
control channel would make it), how the answer comes back (the bytes the host made), and
how rung 3 kills (here: the job is given up on, and the target is told to return, as
nothing can kill the thread it runs in).

The host serves in the main thread of the test process (rung 2 is a signal, and Python
runs signal handlers there only), while the event loop runs in a thread of its own:
``drive()`` sets that up.
"""

from __future__ import annotations

import pickle
import queue
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import cloudpickle

from threadbridge._backend import Backend
from threadbridge._host import Host
from threadbridge._ladder import Ending, Run
from threadbridge._pickling import loads_answer

T = TypeVar("T")

RUNG2_SIGNAL = signal.SIGUSR2
# Set at rung 3 (what a kill would do): a target that waits for it returns. Module-level,
# so that a target refers to it by name rather than carry it in its pickled job.
KILLED = threading.Event()


class FakeWork:
    """One job on the fake host: the ladder's Work."""

    def __init__(self, backend: FakeRemote, run: Run, job_id: int) -> None:
        self.backend = backend
        self.run = run
        self.job_id = job_id
        self.lock = threading.Lock()
        self.reported = False
        self.ended = threading.Event()  # the host has answered (or the job was killed)

    def request_stop(self) -> None:
        self.backend.host.stop(self.job_id)

    def interrupt(self, announce: Callable[[], None] | None = None) -> bool:
        backend = self.backend
        with backend.threads_changed:
            backend.interrupting += 1  # serve() waits for it before joining the resenders
        try:
            job = backend.host.interrupt(self.job_id, announce=announce)
            if job is None:
                return False
            backend.interrupts_reached += 1

            resender = threading.Thread(
                target=backend.host.send_again_until_heard,
                args=(job, self.ended.wait),
                name="fake-resend",
            )
            resender.start()
            with backend.threads_changed:
                backend.threads.append(resender)
            return True
        finally:
            with backend.threads_changed:
                backend.interrupting -= 1
                backend.threads_changed.notify_all()

    def force(self) -> None:
        with self.lock:
            if self.reported:
                return
            self.reported = True
        self.ended.set()
        KILLED.set()  # what a kill would do to the target: it returns
        self.run.report(Ending.KILLED)

    def describe(self) -> str:
        return f"fake host running {self.run.name}"

    def answered(self, data: bytes) -> None:
        self.ended.set()
        with self.lock:
            if self.reported:
                return  # killed meanwhile: its answer is discarded
            self.reported = True
        self.run.report_answer(loads_answer(data, self.run.name))


class FakeRemote(Backend):
    """The backend: jobs go to ``serve()``, which runs them on a Host."""

    name = "fake"

    def __init__(self) -> None:
        self.host = Host(
            RUNG2_SIGNAL, where="in the fake host", loads=pickle.loads, host_name="the fake host"
        )
        self.queue: queue.SimpleQueue[tuple[int, bytes, FakeWork] | None] = queue.SimpleQueue()
        self.next_id = 0
        self.works: list[FakeWork] = []
        self.interrupts_reached = 0
        self.threads_changed = threading.Condition()
        self.interrupting = 0  # interrupt() calls under way
        self.threads: list[threading.Thread] = []  # the resenders

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
        return cloudpickle.dumps((func, args))  # type: ignore[no-any-return]

    def start(self, run: Run, job: Any) -> FakeWork:
        self.next_id += 1
        work = FakeWork(self, run, self.next_id)
        self.works.append(work)
        run.attach(work)
        self.queue.put((work.job_id, job, work))
        return work

    def default_limit(self) -> int:
        return 1

    def serve(self) -> None:
        """In the main thread: run jobs until told to stop (None)."""
        previous = signal.getsignal(RUNG2_SIGNAL)
        self.host.install()
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                job_id, payload, work = item
                work.answered(self.host.run(job_id, payload))
        finally:
            signal.signal(RUNG2_SIGNAL, previous)
            with self.threads_changed:
                self.threads_changed.wait_for(lambda: not self.interrupting, timeout=30)
                threads = list(self.threads)
            for thread in threads:
                thread.join()


def drive(loop: str, main: Callable[[FakeRemote], Awaitable[T]]) -> T:
    """Run ``main(backend)`` in an event loop of its own thread while the fake host serves
    in this (the main) thread; its result, or its exception."""
    assert threading.current_thread() is threading.main_thread()
    KILLED.clear()
    backend = FakeRemote()
    outcome: list[Any] = []

    def in_loop() -> None:
        try:
            outcome.append((True, anyio.run(main, backend, backend=loop)))
        except BaseException as exc:
            outcome.append((False, exc))
        finally:
            backend.queue.put(None)

    thread = threading.Thread(target=in_loop, name="fake-loop")
    thread.start()
    backend.serve()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
