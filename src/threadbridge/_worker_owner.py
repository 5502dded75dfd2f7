"""What a worker process (``_worker_process.WorkerProcess``) needs of the pool that owns
it and of the job it runs: the narrow protocols a worker is given, so that it never
reaches back into its pool or its backend."""

from __future__ import annotations

import subprocess
from typing import Protocol, TypeVar

from . import _spawn
from ._errors import WorkerCrashed
from ._forkserver import ForkServed
from ._ladder import Run
from ._pickling import Answer

Worker = TypeVar("Worker", contravariant=True)  # the worker that tells its owner

Process = subprocess.Popen[bytes] | _spawn.Forked | ForkServed


class Job(Protocol):
    """What a worker needs of the job it runs (the process backend's Work)."""

    job_id: int
    run: Run  # the call it is for
    interrupt_sent: bool  # rung 2 was sent for it
    started: float  # when it was sent to the worker, by time.monotonic()

    def describe(self) -> str: ...

    def answered(self, answer: Answer, *, hand_back: bool = True) -> None: ...

    def killed(self) -> None: ...

    def crashed(
        self,
        returncode: int | None,
        *,
        pipe_closed: bool = False,
        error: WorkerCrashed | None = None,
    ) -> None: ...


class Owner(Protocol[Worker]):
    """What a worker needs of the pool that owns it: how to start its process, and whom
    to tell of its boot, its answers and its end."""

    initializer: bytes | None  # a pickled job each worker runs first
    initializer_name: str
    closed: bool

    def start_process(self, job_r: int, control_r: int, result_w: int) -> Process: ...

    def booted(self) -> None: ...

    def returned(self, worker: Worker) -> None: ...

    def init_failed(self, error: BaseException, *, for_job: bool) -> BaseException | None: ...

    def ended(
        self,
        worker: Worker,
        *,
        reaped: bool,
        early: bool = False,
        boot_error: BaseException | None = None,
        told: bool = False,
    ) -> None: ...
