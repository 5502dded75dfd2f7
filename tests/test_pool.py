"""threadbridge.ProcessPool: pools users shape, used inside ``async with``."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import threadbridge as tb
from threadbridge import _spawn

from . import targets
from .helpers import wait_for_pool_threads
from .test_process import gone, lines_of

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="the process backend is POSIX only"),
]


async def test_calls_run_in_the_pools_workers_which_end_with_the_block() -> None:
    """Calls naming the pool run in its own workers (not the default pool's); leaving the
    block ends them and reaps them."""
    default_pid = await tb.run_killable(targets.pid, backend="process")
    async with tb.ProcessPool(2) as pool:
        pids = {await tb.run_killable(targets.pid, backend=pool) for _ in range(3)}
        workers = {p.pid for p in psutil.Process().children()}
        assert pids <= workers
    assert default_pid not in pids
    assert all(gone(pid) for pid in pids)
    assert await tb.run_killable(targets.pid, backend="process") == default_pid


async def test_workers_is_the_default_limit() -> None:
    async with tb.ProcessPool(3) as pool:
        assert tb.default_limiter(pool).total_tokens == 3
        assert tb.default_limiter("process") is not tb.default_limiter(pool)


async def test_initializer_runs_in_each_worker_first(tmp_path: Path) -> None:
    log = tmp_path / "log"
    async with tb.ProcessPool(
        1, initializer=targets.initialize, initargs=(str(log), {"model": 1})
    ) as pool:
        pid, value = await tb.run_killable(targets.initialized, backend=pool)
        assert value == {"model": 1}
        assert pid != os.getpid()
    # The worker that ran the call, and maybe its standby: each initialized once.
    assert 1 <= len(await lines_of(log, 1)) <= 2


async def test_a_cold_start_starts_the_standby_once_its_worker_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that found no idle worker starts one of its own; the standby is started
    only once that worker is ready (two interpreters starting at once on a small machine
    slow the call's own), even with no standby delay at all."""
    from threadbridge import _worker_pool
    from threadbridge._worker_pool import WorkerPool

    monkeypatch.setattr(_worker_pool, "STANDBY_DELAY", 0.0)
    events: list[str] = []
    new_worker, booted = WorkerPool._new_worker, WorkerPool.booted

    def noted_new_worker(self: WorkerPool, state: str) -> Any:
        events.append(f"new {state}")
        return new_worker(self, state)

    def noted_booted(self: WorkerPool) -> None:
        events.append("ready")
        booted(self)

    monkeypatch.setattr(WorkerPool, "_new_worker", noted_new_worker)
    monkeypatch.setattr(WorkerPool, "booted", noted_booted)
    log, gate, job = tmp_path / "log", tmp_path / "gate", tmp_path / "job"
    async with (
        tb.ProcessPool(
            2, initializer=targets.initialize_after, initargs=(str(log), str(gate))
        ) as pool,
        anyio.create_task_group() as tg,
    ):
        # A call that runs until told: its worker is busy when the standby is due.
        tg.start_soon(
            functools.partial(tb.run_killable, targets.busy_until_file, str(job), backend=pool)
        )
        await lines_of(log, 1)  # the call's worker waits in its initializer
        gate.touch()
        with anyio.fail_after(30):
            while len(events) < 4:  # until the standby is ready too
                await anyio.sleep(0.005)
        Path(str(job) + ".go").touch()
    assert events == ["new busy", "ready", "new idle", "ready"]


async def test_failing_initializer_is_one_error_then_a_broken_pool(tmp_path: Path) -> None:
    """The initializer's error reaches the caller once, as itself with the worker's
    traceback; later calls get a RuntimeError that says why; no worker is started again."""
    log = tmp_path / "log"
    async with tb.ProcessPool(
        1, initializer=targets.failing_initializer, initargs=(str(log),)
    ) as pool:
        with pytest.raises(targets.CustomError, match="the initializer failed") as info:
            await tb.run_killable(targets.pid, backend=pool)
        text = "".join(traceback.format_exception(info.value))
        assert "failing_initializer" in text
        assert "targets.py" in text
        for _ in range(3):
            with pytest.raises(RuntimeError, match="initializer failed") as later:
                await tb.run_killable(targets.pid, backend=pool)
            assert isinstance(later.value.__cause__, targets.CustomError)
    await wait_for_pool_threads()
    # Every worker of the pool is gone now. The initializer ran in the first worker and
    # perhaps in the standby started beside it: never more.
    assert 1 <= len(log.read_text().splitlines()) <= 2


async def test_workers_retire_after_max_tasks() -> None:
    async with tb.ProcessPool(1, max_tasks_per_worker=2) as pool:
        pids = [await tb.run_killable(targets.pid, backend=pool) for _ in range(6)]
    assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [2, 2, 2]
    assert all(gone(pid) for pid in pids)


async def test_idle_workers_retire_after_idle_timeout(tmp_path: Path) -> None:
    gates = [tmp_path / "a", tmp_path / "b"]
    async with tb.ProcessPool(2, idle_timeout=0.2) as pool:
        async with anyio.create_task_group() as tg:
            for gate in gates:
                tg.start_soon(
                    lambda g: tb.run_killable(targets.busy_until_file, str(g), backend=pool),
                    gate,
                )
            for gate in gates:
                await lines_of(gate, 1)
            for gate in gates:
                Path(f"{gate}.go").touch()
        with anyio.fail_after(10):
            while tb.stats().idle_workers > 1:
                await anyio.sleep(0.02)
        assert await tb.run_killable(targets.add, 1, 2, backend=pool) == 3


async def test_leaving_the_block_runs_the_ladder_of_running_calls(tmp_path: Path) -> None:
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    async with tb.ProcessPool(1) as pool:
        handle = tb.spawn(targets.write_pid_then_sleep, str(path), 60, backend=pool, policy=policy)
        (line,) = await lines_of(path, 1)
        started = time.monotonic()
    assert handle.done()
    assert handle.stage is tb.Stage.INTERRUPTED
    assert time.monotonic() - started < 20
    assert gone(int(line))


async def test_use_outside_the_block_is_a_clear_error() -> None:
    pool = tb.ProcessPool(1)
    with pytest.raises(RuntimeError, match="inside its block"):
        await tb.run_killable(targets.pid, backend=pool)
    async with pool:
        assert await tb.run_killable(targets.add, 2, 2, backend=pool) == 4
    with pytest.raises(RuntimeError, match="block has ended"):
        await tb.run_killable(targets.pid, backend=pool)
    with pytest.raises(RuntimeError, match="entered once"):
        async with pool:
            pass


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_fork_start_method() -> None:
    async with tb.ProcessPool(1, start_method="fork") as pool:
        assert await tb.run_killable(targets.add, 1, 2, backend=pool) == 3


HELD_IMPORT = """
import os
from tests import targets

if os.getpid() == {parent}:  # in the parent only: a forked worker imports it at once
    targets.IMPORTING.set()
    targets.IMPORT_GATE.wait()
VALUE = 42
"""


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_fork_while_a_thread_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker forked while another thread of the parent is in the middle of importing a
    module (threadbridge's own loop thread loads tblib for an answer's traceback) holds
    that module's import lock with no thread to release it: CPython does not free such
    locks in a fork's child. The worker imports the module afresh instead of waiting on
    it for ever."""
    (tmp_path / "held_import.py").write_text(HELD_IMPORT.format(parent=os.getpid()))
    monkeypatch.syspath_prepend(str(tmp_path))
    importer = threading.Thread(target=__import__, args=("held_import",))
    importer.start()
    try:
        await anyio.to_thread.run_sync(targets.IMPORTING.wait)
        async with tb.ProcessPool(1, start_method="fork") as pool:
            with anyio.fail_after(30):
                value = await tb.run_killable(targets.value_of, "held_import", backend=pool)
        assert value == 42
    finally:
        targets.IMPORT_GATE.set()
        importer.join()
        sys.modules.pop("held_import", None)
        targets.IMPORTING.clear()
        targets.IMPORT_GATE.clear()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workers": 0}, ValueError, "workers must be a positive int"),
        ({"max_tasks_per_worker": 0}, ValueError, "max_tasks_per_worker"),
        ({"idle_timeout": -1}, ValueError, "idle_timeout must be >= 0"),
        ({"idle_timeout": "soon"}, ValueError, "idle_timeout must be seconds"),
        ({"start_method": "threads"}, ValueError, "start method must be one of"),
        ({"initializer": anyio.sleep}, TypeError, "async function"),
        ({"initializer": targets.add, "initargs": (1, threading.Lock())}, TypeError, "argument 2"),
    ],
)
async def test_bad_arguments(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tb.ProcessPool(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif("forkserver" not in _spawn.START_METHODS, reason="no fork server here")
async def test_forkserver_start_method(tmp_path: Path) -> None:
    """Workers forked from the pool's own fork server: calls, crashes with their exit
    code, kills with their stage; the server and its workers end with the block."""
    before = {p.pid for p in psutil.Process().children()}  # helpers of earlier tests
    async with tb.ProcessPool(1, start_method="forkserver") as pool:
        pid, parent = await tb.run_killable(targets.pid_and_parent, backend=pool)
        assert parent != os.getpid()  # the fork server's child, not ours
        server = psutil.Process(parent)
        assert server.ppid() == os.getpid()
        with pytest.raises(tb.WorkerCrashed, match="exited with code 3") as info:
            await tb.run_killable(targets.exit_with, 3, backend=pool)
        assert info.value.exitcode == 3
        path = tmp_path / "log"
        policy = tb.Policy(grace=0, interrupt=False, interrupt_grace=0)
        handle = tb.spawn(targets.write_pid_then_sleep, str(path), 60, backend=pool, policy=policy)
        (line,) = await lines_of(path, 1)
        assert await handle.stop() is tb.Stage.KILLED
        assert gone(int(line))
        assert await tb.run_killable(targets.add, 1, 2, backend=pool) == 3
    assert gone(pid)
    assert gone(parent)
    left = [p.cmdline() for p in psutil.Process().children() if p.pid not in before]
    assert left == []


async def test_pool_from_another_event_loop_is_a_clear_error() -> None:
    async with tb.ProcessPool(1) as pool:

        async def elsewhere() -> str:
            try:
                await tb.run_killable(targets.pid, backend=pool)
            except RuntimeError as exc:
                return str(exc)
            return "no error"

        message = await anyio.to_thread.run_sync(anyio.run, elsewhere)
        assert "belongs to another event loop" in message
        assert await tb.run_killable(targets.add, 1, 1, backend=pool) == 2


@pytest.mark.parametrize("child_returns", [True, False])
async def test_initializer_that_forks_runs_each_job_once(
    tmp_path: Path, child_returns: bool
) -> None:
    """An initializer whose forked child returns into the worker: the child never reads
    the worker's jobs, so each job runs once, in the worker, and is answered."""
    log, runs = tmp_path / "log", tmp_path / "runs"
    async with tb.ProcessPool(
        1, initializer=targets.forking_initializer, initargs=(str(log), child_returns)
    ) as pool:
        for i in range(6):
            with anyio.fail_after(30):
                await tb.run_killable(targets.mark, str(runs), str(i), backend=pool)
    assert runs.read_text().splitlines() == [str(i) for i in range(6)]
    initialized = set(await lines_of(log, 1))
    assert all(gone(int(pid)) for pid in initialized)


async def test_initializer_that_exits_is_named_with_its_code(tmp_path: Path) -> None:
    """An initializer that exits the worker: the call gets WorkerCrashed naming the
    initializer and its exit code; later calls get the same clear error (the pool is
    broken), and no worker is started in a loop."""
    log = tmp_path / "log"
    async with tb.ProcessPool(
        1, initializer=targets.exiting_initializer, initargs=(str(log), 3)
    ) as pool:
        with pytest.raises(tb.WorkerCrashed, match="initializer exiting_initializer") as info:
            await tb.run_killable(targets.pid, backend=pool)
        assert info.value.exitcode == 3
        assert "exited with code 3" in str(info.value)
        for _ in range(3):
            with pytest.raises(RuntimeError, match="initializer") as later:
                await tb.run_killable(targets.pid, backend=pool)
            assert isinstance(later.value.__cause__, tb.WorkerCrashed)
    await wait_for_pool_threads()
    # The worker that took the call, and perhaps a standby beside it: never more.
    assert 1 <= len(log.read_text().splitlines()) <= 2


@pytest.mark.parametrize(
    ("method", "failure"),
    [
        *((m, "initializer exits") for m in _spawn.START_METHODS),
        *((m, "cannot boot") for m in _spawn.START_METHODS if m != "fork"),
    ],
)
async def test_workers_that_cannot_start_are_not_started_in_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, failure: str
) -> None:
    """Workers that end before they are ready (an initializer that exits; an interpreter
    that cannot boot) are not replaced in a loop: the pool stops after a few, with one
    clear error for its calls, and no process is started after that."""
    from threadbridge import _worker_pool
    from threadbridge._worker_owner import Process

    starts = []
    start_process = _worker_pool.WorkerPool.start_process

    def counted(self: _worker_pool.WorkerPool, *fds: int) -> Process:
        starts.append(self)
        return start_process(self, *fds)

    monkeypatch.setattr(_worker_pool.WorkerPool, "start_process", counted)
    options: dict[str, Any] = {"start_method": method}
    if failure == "initializer exits":
        options.update(initializer=targets.exiting_initializer, initargs=(str(tmp_path / "x"), 7))
    else:
        # A Python home that does not exist: a new interpreter dies as it starts.
        monkeypatch.setenv("PYTHONHOME", str(tmp_path / "nowhere"))
    errors: list[BaseException] = []
    async with tb.ProcessPool(1, **options) as pool:
        with anyio.fail_after(60):
            while not errors or not isinstance(errors[-1], RuntimeError):
                try:
                    await tb.run_killable(targets.pid, backend=pool)
                except (tb.WorkerCrashed, RuntimeError, OSError) as exc:
                    errors.append(exc)
        broken = errors[-1]
        assert isinstance(broken.__cause__, tb.WorkerCrashed)
        assert "could not start" in str(broken.__cause__) or "initializer" in str(broken.__cause__)
        await wait_for_pool_threads()
        started = len(starts)
        for _ in range(3):  # later calls fail at once, and start nothing
            with pytest.raises(RuntimeError):
                await tb.run_killable(targets.pid, backend=pool)
        await wait_for_pool_threads()
    assert len(starts) == started <= _worker_pool.MAX_FAILED_STARTS + 1


def test_a_standby_due_when_no_thread_can_start_is_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At interpreter exit (3.12 and later) no thread may start: a standby worker that
    falls due then is skipped quietly (it was an "error while escalating" traceback on
    the program's stderr)."""
    import weakref

    from threadbridge import _locks, _worker_pool

    class Pool:  # what _standby_due reads of a pool
        def __init__(self) -> None:
            self.lock = _locks.Lock()
            self.standby_timer: object = object()
            self.closed = False
            self.idle: list[object] = []
            self.added = 0

        def _add_standby(self) -> None:
            self.added += 1

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    pool = Pool()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    with caplog.at_level("DEBUG", logger="threadbridge"):
        _worker_pool._standby_due(weakref.ref(pool))  # type: ignore[arg-type]
    monkeypatch.undo()
    assert pool.standby_timer is None
    assert pool.added == 0
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
