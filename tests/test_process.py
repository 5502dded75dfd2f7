"""backend="process": warm workers, the ladder by signals, nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio
import psutil
import pytest

import threadbridge as tb
from threadbridge import _spawn

from . import targets
from .helpers import ALL_LOOPS, wait_for_pool_threads

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform == "win32", reason="the process backend is POSIX only"),
]


@pytest.fixture(params=ALL_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """asyncio, trio, and asyncio on uvloop."""
    return request.param


P: Literal["process"] = "process"


async def lines_of(path: Path, count: int) -> list[str]:
    """The first ``count`` lines a worker has written to ``path`` (bounded wait)."""
    with anyio.fail_after(30):
        while True:
            if path.exists():
                lines = path.read_text().splitlines()
                if len(lines) >= count:
                    return lines
            await anyio.sleep(0.005)


def gone(pid: int) -> bool:
    """The process has exited (a zombie whose parent is not us counts as exited)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def test_result_and_warm_reuse() -> None:
    """A call returns its result; later calls reuse the same warm worker."""
    assert await tb.run_killable(targets.add, 2, 3, backend=P) == 5
    first = await tb.run_killable(targets.pid, backend=P)
    assert first != os.getpid()
    assert await tb.run_killable(targets.pid, backend=P) == first


async def test_large_arguments_and_results_travel_whole() -> None:
    """Arguments and results far larger than one read of the pipes (here 40 MB each
    way, and a small call after each) arrive whole, in order, through the same worker."""
    data = bytes(range(256)) * (40 * 2**20 // 256)
    doubled = await tb.run_killable(bytes.__add__, data, data[:1000], backend=P)
    assert len(doubled) == len(data) + 1000
    assert doubled[: len(data)] == data
    assert doubled[len(data) :] == data[:1000]
    assert await tb.run_killable(targets.add, 1, 2, backend=P) == 3
    assert await tb.run_killable(len, data, backend=P) == len(data)
    assert await tb.run_killable(targets.add, 3, 4, backend=P) == 7


async def test_worker_leads_its_own_process_group() -> None:
    """Each worker leads its own process group, so rungs 2 and 3 reach its children."""
    pid, pgid = await tb.run_killable(targets.pgid, backend=P)
    assert pid == pgid != os.getpgrp()


async def test_worker_does_not_import_anyio_or_trio() -> None:
    """The worker's entry point is light: no anyio, no trio."""
    assert await tb.run_killable(targets.imports_of_worker, backend=P) == []


async def test_lambdas_and_closures_travel() -> None:
    """cloudpickle carries lambdas and closures defined here."""
    offset = 10
    assert await tb.run_killable(lambda x: x + offset, 5, backend=P) == 15

    def local(n: int) -> list[int]:
        return [i * offset for i in range(n)]

    assert await tb.run_killable(local, 3, backend=P) == [0, 10, 20]


async def test_exception_keeps_type_and_worker_traceback() -> None:
    """The target's exception arrives as its own type, with the worker's frames."""
    with pytest.raises(targets.CustomError, match="boom") as info:
        await tb.run_killable(targets.raise_custom, "boom", backend=P)
    text = "".join(traceback.format_exception(info.value))
    assert "raise_custom" in text
    assert "targets.py" in text


async def test_unpicklable_argument_is_type_error_before_any_worker() -> None:
    """An argument that cannot be pickled: TypeError naming it; no worker is used."""
    busy_before = tb.stats().busy_workers
    with pytest.raises(TypeError, match=r"argument 2 to add \(lock"):
        await tb.run_killable(targets.add, 1, threading.Lock(), backend=P)  # type: ignore[arg-type]
    assert tb.stats().busy_workers == busy_before
    assert tb.default_limiter("process").borrowed_tokens == 0
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


async def test_unpicklable_result_is_clear_error() -> None:
    """A result that cannot be pickled back is a TypeError saying so; the pool lives."""
    with pytest.raises(TypeError, match=r"result .* cannot be pickled"):
        await tb.run_killable(targets.return_unpicklable, backend=P)
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


@pytest.mark.parametrize(
    ("target", "type_name"),
    [
        (targets.raise_unpicklable, "tests.targets.Unpicklable"),
        (targets.raise_unloadable, "tests.targets.Unloadable"),
    ],
)
async def test_exception_that_cannot_travel_is_remote_error(target: object, type_name: str) -> None:
    """An exception that cannot be pickled back arrives as RemoteError with its text."""
    with pytest.raises(tb.RemoteError) as info:
        await tb.run_killable(target, backend=P)  # type: ignore[arg-type]
    assert info.value.type_name == type_name
    assert info.value.message
    assert "Traceback" in info.value.traceback_text
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


@pytest.mark.parametrize(
    ("target", "args", "exitcode", "signum"),
    [
        (targets.exit_with, (3,), 3, None),
        (targets.segfault, (), None, signal.SIGSEGV),
    ],
)
async def test_crash_is_worker_crashed_and_pool_survives(
    target: object, args: tuple[object, ...], exitcode: int | None, signum: int | None
) -> None:
    """os._exit and a segfault give WorkerCrashed with the code or signal."""
    with pytest.raises(tb.WorkerCrashed) as info:
        await tb.run_killable(target, *args, backend=P)  # type: ignore[arg-type]
    assert info.value.exitcode == exitcode
    assert info.value.signal == signum
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


async def test_sigkill_from_outside_is_worker_crashed(tmp_path: Path) -> None:
    """A worker SIGKILLed by someone else gives WorkerCrashed(signal=SIGKILL), which names
    the worker's pid."""
    path = tmp_path / "pid"
    handle = tb.spawn(targets.write_pid_then_sleep, str(path), 60, backend=P)
    (worker,) = await lines_of(path, 1)
    os.kill(int(worker), signal.SIGKILL)
    with pytest.raises(tb.WorkerCrashed) as info:
        await handle
    assert info.value.signal == signal.SIGKILL
    assert info.value.pid == int(worker)
    assert f"pid {worker}" in str(info.value)
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


async def test_rung1_token_is_visible_in_the_worker(tmp_path: Path) -> None:
    """Rung 1 sets the token inside the worker; a cooperative target stops there."""
    path = tmp_path / "log"
    handle = tb.spawn(targets.cooperative, str(path), backend=P, policy=tb.Policy(grace=30))
    await lines_of(path, 1)
    assert await handle.stop() is tb.Stage.COOPERATIVE
    assert path.read_text().splitlines() == ["started", "token True", "finally"]


async def test_threadbridge_sleep_wakes_in_worker(tmp_path: Path) -> None:
    """threadbridge.sleep() in a worker wakes up at rung 1."""
    path = tmp_path / "log"
    handle = tb.spawn(targets.tb_sleeper, str(path), backend=P, policy=tb.Policy(grace=30))
    await lines_of(path, 1)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await handle
    assert handle.stage is tb.Stage.COOPERATIVE
    assert path.read_text().splitlines() == ["started", "woke"]


async def test_token_clear_in_plain_call() -> None:
    """A target that is not cancelled sees a clear token."""
    assert await tb.run_killable(targets.token_state, backend=P) == (False, False)


async def test_rung2_sigterm_interrupts_blocking_sleep(tmp_path: Path) -> None:
    """SIGTERM becomes TargetCancelled in the target: time.sleep ends, finally runs."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    handle = tb.spawn(targets.blocking_sleeper, str(path), backend=P, policy=policy)
    await lines_of(path, 1)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await handle
    assert handle.stage is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines() == ["started", "TargetCancelled", "finally"]
    # Where it was as rung 2 fired, taken in the worker (its control thread) and sent back
    # before the answer: the target's frames (from its own), not the worker's.
    assert handle.stopped_at is not None
    assert handle.stopped_at.splitlines()[0].endswith(", in blocking_sleeper")
    # The worker survived rung 2 and is reused.
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


async def test_rung2_dropped_in_a_del_is_delivered_again(tmp_path: Path) -> None:
    """Rung 2's SIGTERM handled inside a __del__, where CPython drops the exception it
    raises, is delivered again: the target is interrupted, not left to rung 3."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt_grace=30)
    handle = tb.spawn(targets.rung2_lands_in_del, str(path), backend=P, policy=policy)
    await lines_of(path, 1)  # "in __del__": it sleeps there
    with anyio.fail_after(20):
        assert await handle.stop() is tb.Stage.INTERRUPTED
    log = path.read_text().splitlines()
    # Delivered again once __del__ has ended: in the sleeper's sleep, in its first mark(),
    # or before its try began.
    assert log in (
        ["in __del__", "started", "TargetCancelled", "finally"],
        ["in __del__", "TargetCancelled", "finally"],
        ["in __del__"],
    )
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


async def test_uninterruptible_holds_off_sigterm(tmp_path: Path) -> None:
    """In a worker, rung 2 inside uninterruptible() fires when the block exits."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt_grace=30)
    handle = tb.spawn(targets.uninterruptible_then_sleep, str(path), 0.5, backend=P, policy=policy)
    await lines_of(path, 2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await handle
    assert handle.stage is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines() == [
        "started",
        "in block",
        "block done",
        "TargetCancelled",
    ]


async def test_rung3_kills_worker_and_grandchild(tmp_path: Path) -> None:
    """A target that ignores SIGTERM is SIGKILLed with its grandchild; both are gone."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=0.1)
    handle = tb.spawn(targets.ignores_sigterm_with_grandchild, str(path), backend=P, policy=policy)
    (line,) = await lines_of(path, 1)
    worker, grandchild = (int(x) for x in line.split())
    with anyio.CancelScope() as scope:
        scope.cancel()
        await handle
    assert handle.stage is tb.Stage.KILLED
    # Reaped by the time the await returned: not even a zombie of ours.
    assert not psutil.pid_exists(worker) or gone(worker)
    assert worker not in [p.pid for p in psutil.Process().children()]
    with anyio.fail_after(10):
        while not gone(grandchild):
            await anyio.sleep(0.01)
    # A standby took over: the next call does not wait for a cold start.
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


async def test_swallowing_target_is_killed(tmp_path: Path) -> None:
    """A target that swallows TargetCancelled is killed after interrupt_grace."""
    path = tmp_path / "log"
    # Rung 2 reaches the target through the worker's control thread and a signal: on a
    # loaded machine that can take longer than 0.1 s, and the target would be killed
    # before it could swallow anything. interrupt_grace bounds that, generously.
    policy = tb.Policy(grace=0.05, interrupt_grace=2)
    handle = tb.spawn(targets.swallows, str(path), backend=P, policy=policy)
    await lines_of(path, 1)
    assert await handle.stop() is tb.Stage.KILLED
    assert path.read_text().splitlines() == ["started", "swallowed"]


async def test_rung2_is_sent_again_until_its_handler_has_run(tmp_path: Path) -> None:
    """Rung 2's signal can reach the worker without reaching threadbridge's handler before
    the target blocks: CPython runs a Python signal handler only between bytecodes, so a
    signal that arrives just before a blocking call (time.sleep, a read) waits for the
    call to return. The worker sends it again until its handler has run; here a target
    takes the first one itself and then sleeps, and still ends INTERRUPTED, not KILLED."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt_grace=10)
    handle = tb.spawn(targets.takes_first_rung2_signal, str(path), backend=P, policy=policy)
    await lines_of(path, 1)
    assert await handle.stop() is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines() == ["started", "took the signal", "interrupted"]


async def test_workers_ignore_sigint() -> None:
    """SIGINT is the parent's: a worker that receives one goes on."""
    assert await tb.run_killable(targets.sigint_self_then_return, backend=P) == "survived SIGINT"


async def test_stats_report_workers() -> None:
    """stats() shows busy, idle and standby workers."""
    await tb.run_killable(targets.add, 1, 1, backend=P)
    stats = tb.stats()
    assert stats.busy_workers == 0
    assert stats.idle_workers >= 1
    assert stats.standby_workers <= stats.idle_workers


async def test_default_process_limiter_is_one_per_usable_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """By default one busy worker per CPU this process may use (its affinity: a
    container's cpuset, taskset), not per CPU of the machine; a ProcessPool's default
    size too."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    if hasattr(os, "process_cpu_count"):
        monkeypatch.setattr(os, "process_cpu_count", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert tb.default_limiter("process").total_tokens == 1
    assert "workers=1 " in repr(tb.ProcessPool())


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_parent_death_kills_busy_worker_and_grandchild(tmp_path: Path, method: str) -> None:
    """SIGKILL the parent: its busy worker and the worker's child exit promptly (and a
    fork server, with the "forkserver" start method)."""
    path = tmp_path / "log"
    code = textwrap.dedent(
        f"""
        import sys, anyio, threadbridge as tb
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests import targets
        tb.set_start_method({method!r})
        async def main():
            await tb.run_killable(targets.ignores_sigterm_with_grandchild, {str(path)!r},
                                  backend="process")
        anyio.run(main)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for_text(path, "the worker never started")
        helpers = [p.pid for p in psutil.Process(parent.pid).children()]  # a fork server
        kill_parent_then_check_worker_gone(parent, path)
        deadline = time.monotonic() + 10
        while not all(gone(pid) for pid in helpers):
            assert time.monotonic() < deadline, "a fork server outlived its parent"
            time.sleep(0.005)
    finally:
        parent.kill()
        parent.wait()


def wait_for_text(path: Path, failure: str) -> None:
    """Wait (up to 60 s) until another process has written something to ``path``."""
    deadline = time.monotonic() + 60
    while not path.exists() or not path.read_text().strip():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


def kill_parent_then_check_worker_gone(parent: subprocess.Popen[bytes], path: Path) -> None:
    """SIGKILL ``parent``; the worker and grandchild named in ``path`` must go soon after.

    Left alone, both would live on for a minute or more (the target ignores SIGTERM and
    sleeps; its child sleeps 60 s), so a bound of 10 s tells the two apart on the busiest
    machine; on an idle one they go within milliseconds."""
    worker, grandchild = (int(x) for x in path.read_text().split())
    parent.kill()
    parent.wait()
    t0 = time.monotonic()
    while not (gone(worker) and gone(grandchild)):
        assert time.monotonic() - t0 < 10.0, "the worker outlived its parent by 10 s"
        time.sleep(0.005)


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
def test_short_program_exits_promptly_and_leaves_nothing(tmp_path: Path, runner: str) -> None:
    """A program that used the process backend exits at once, its workers gone."""
    path = tmp_path / "pids"
    code = textwrap.dedent(
        f"""
        import sys, anyio, threadbridge as tb
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests import targets
        async def main():
            for _ in range(3):
                targets.mark({str(path)!r}, str(await tb.run_killable(targets.pid,
                                                                      backend="process")))
        anyio.run(main, backend={runner!r})
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stderr == ""
    for pid in {int(x) for x in path.read_text().split()}:
        assert gone(pid)


@pytest.fixture
def fork_start() -> Iterator[None]:
    tb.set_start_method("fork")
    try:
        yield
    finally:
        tb.set_start_method("spawn")


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.usefixtures("fork_start")
async def test_fork_start_method(tmp_path: Path) -> None:
    """With set_start_method("fork") workers start by os.fork and climb the same ladder."""
    pid, pgid = await tb.run_killable(targets.pgid, backend=P)
    assert pid == pgid != os.getpid()
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=0.1)
    handle = tb.spawn(targets.ignores_sigterm_with_grandchild, str(path), backend=P, policy=policy)
    (line,) = await lines_of(path, 1)
    assert await handle.stop() is tb.Stage.KILLED
    grandchild = int(line.split()[1])
    with anyio.fail_after(10):
        while not gone(grandchild):
            await anyio.sleep(0.01)
    assert await tb.run_killable(targets.add, 2, 2, backend=P) == 4


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_worker_forked_while_an_ended_one_is_still_listed_keeps_its_pipes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that ends closes its pipes before its pool forgets it, and a new worker
    made meanwhile (a standby, on another thread) gets the lowest free descriptors: the
    numbers just closed. A forked child closes its copies of the parent's pipes; it must
    not close those numbers, its own pipes now. (The new worker died at once, without a
    word, and the call given to it raised WorkerCrashed.)"""
    from threadbridge import _worker_pool
    from threadbridge._worker_pool import WorkerPool
    from threadbridge._worker_process import WorkerProcess

    # No standby of the usual kind: the only idle worker must be the one made below, so
    # that the next call is given to it. (On a loaded machine the crash can come after
    # the standby delay, and the call went to that standby.)
    monkeypatch.setattr(_worker_pool, "STANDBY_DELAY", 3600.0)
    made: list[WorkerProcess] = []
    ended = WorkerPool.ended

    def make_one_first(self: WorkerPool, worker: WorkerProcess, **how: Any) -> None:
        if not made:  # the ended worker is still listed, its pipes closed
            made.append(self._new_worker("idle"))
        ended(self, worker, **how)

    monkeypatch.setattr(WorkerPool, "ended", make_one_first)
    async with tb.ProcessPool(1, start_method="fork") as pool:
        with pytest.raises(tb.WorkerCrashed):
            await tb.run_killable(targets.exit_with, 3, backend=pool)
        assert len(made) == 1
        assert await tb.run_killable(os.getpid, backend=pool) == made[0].pid


async def test_a_write_in_progress_keeps_its_pipe_number_from_reuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job's payload is still being written when its worker dies. The ending worker
    must not close the job pipe under that write: a new pipe (another worker's) would be
    given its number, and the rest of the frame would go there. The pipe is closed as the
    write ends, and the pool goes on."""
    from threadbridge import _wire, _worker_io, _worker_pipes

    real_write = _worker_io.write_frame
    writing, go, written = threading.Event(), threading.Event(), threading.Event()
    held: list[tuple[int, int]] = []  # (descriptor, its pipe's inode) of the held write

    def held_write(fd: int, kind: int, job: int = 0, payload: bytes = b"") -> None:
        if kind != _wire.RUN or held:
            real_write(fd, kind, job, payload)
            return
        held.append((fd, os.fstat(fd).st_ino))
        writing.set()
        try:
            go.wait(30)
            real_write(fd, kind, job, payload)
        finally:
            written.set()

    async with tb.ProcessPool(1) as pool:
        pid = await tb.run_killable(os.getpid, backend=pool)
        monkeypatch.setattr(_worker_pipes, "write_frame", held_write)
        crashed = anyio.Event()

        async def call() -> None:
            # Large enough to be written from a helper thread, not the event loop.
            with pytest.raises(tb.WorkerCrashed):
                await tb.run_killable(len, b"x" * 200_000, backend=pool)
            crashed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            try:
                assert await anyio.to_thread.run_sync(writing.wait, 30)
                os.kill(pid, signal.SIGKILL)
                with anyio.fail_after(30):
                    await crashed.wait()  # the worker has ended and been reported
                fd, inode = held[0]
                assert os.fstat(fd).st_ino == inode  # the job pipe still: not closed under it
            finally:
                go.set()
            assert await anyio.to_thread.run_sync(written.wait, 30)

        def still_the_job_pipe() -> bool:
            try:
                return os.fstat(fd).st_ino == inode
            except OSError:
                return False  # closed (or its number is some new descriptor's)

        with anyio.fail_after(30):  # closed as the write ends
            while still_the_job_pipe():
                await anyio.sleep(0.005)
        assert await tb.run_killable(targets.add, 2, 2, backend=pool) == 4


@pytest.mark.parametrize("moment", ["before it is chosen", "as it is chosen"])
async def test_a_worker_that_is_ending_is_never_given_a_call(
    monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """An idle worker has died and its end is being handled (its pool has not heard yet).
    Its exit cannot be seen from outside: as on macOS before Python 3.13, which cannot
    look without reaping, or for a fork server's worker whose server has not told yet.
    A call must not be given to it, whether its end began before the pool chose it for
    the call or just after: the end is handled without that call, which then waited for
    ever, cancelled or not."""
    from threadbridge._worker_pool import WorkerPool
    from threadbridge._worker_process import WorkerProcess

    async with tb.ProcessPool(1) as pool:
        pid = await tb.run_killable(os.getpid, backend=pool)
        ending, go = threading.Event(), threading.Event()
        ended, acquire = WorkerPool.ended, WorkerPool.acquire

        def held_ended(self: WorkerPool, worker: WorkerProcess, **how: Any) -> None:
            if worker.pid == pid:
                ending.set()  # the end is under way, and the pool has not heard
                go.wait(30)
            ended(self, worker, **how)

        def end_as_chosen(self: WorkerPool) -> WorkerProcess:
            worker = acquire(self)
            if worker.pid == pid:
                os.kill(pid, signal.SIGKILL)
                worker.finish_soon()  # as the loop does once it sees the exit
                assert ending.wait(30)
            return worker

        monkeypatch.setattr(WorkerProcess, "exited", lambda self: False)
        monkeypatch.setattr(WorkerPool, "ended", held_ended)
        try:
            if moment == "before it is chosen":
                os.kill(pid, signal.SIGKILL)
                assert await anyio.to_thread.run_sync(ending.wait, 30)
            else:
                monkeypatch.setattr(WorkerPool, "acquire", end_as_chosen)
            with anyio.fail_after(30):
                other = await tb.run_killable(os.getpid, backend=pool)
            assert other != pid
        finally:
            go.set()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux 5.3+)")
async def test_a_fork_server_worker_that_died_idle_is_not_given_the_next_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork server's worker died while idle, and its server has not yet told: the
    worker's own process descriptor says it has exited, and the next call goes to
    another worker. (It was given to the dead one and failed with WorkerCrashed.)"""
    from threadbridge._forkserver import ForkServed
    from threadbridge._worker_process import WorkerProcess

    async with tb.ProcessPool(1, start_method="forkserver") as pool:
        pid = await tb.run_killable(os.getpid, backend=pool)
        go = threading.Event()
        finish = WorkerProcess.finish

        def held_finish(self: WorkerProcess, **kwargs: bool) -> None:
            if self.pid == pid:
                go.wait(10)  # its end not handled yet (bounded: the old way ends at all)
            finish(self, **kwargs)

        monkeypatch.setattr(ForkServed, "exited", lambda self: False)  # not told yet
        monkeypatch.setattr(WorkerProcess, "finish", held_finish)
        pidfd = os.pidfd_open(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            # Exited as the kernel says (the last of its threads gone). psutil may call
            # it a zombie a moment earlier, its leader dead and other threads not yet.
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            assert await anyio.to_thread.run_sync(poller.poll, 30_000)
            with anyio.fail_after(30):
                other = await tb.run_killable(os.getpid, backend=pool)
            assert other != pid
        finally:
            go.set()
            os.close(pidfd)


def test_unknown_start_method() -> None:
    """An unknown start method is a ValueError listing the choices."""
    with pytest.raises(ValueError, match="spawn"):
        tb.set_start_method("threads")


async def test_idle_workers_retire_but_one_stays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Workers idle past IDLE_TIMEOUT exit; one stays on standby."""
    from threadbridge import _worker_pool

    monkeypatch.setattr(_worker_pool, "IDLE_TIMEOUT", 0.2)
    # Two calls that run at once (each waits for its go file), so two workers end up idle.
    limiter = anyio.CapacityLimiter(2)
    gates = [tmp_path / "a", tmp_path / "b"]
    async with anyio.create_task_group() as tg:
        for gate in gates:
            tg.start_soon(
                lambda g: tb.run_killable(
                    targets.busy_until_file, str(g), backend=P, limiter=limiter
                ),
                gate,
            )
        for gate in gates:
            await lines_of(gate, 1)
        assert tb.stats().busy_workers == 2
        for gate in gates:
            Path(f"{gate}.go").touch()
    assert tb.stats().idle_workers >= 2
    with anyio.fail_after(10):
        while tb.stats().idle_workers > 1:
            await anyio.sleep(0.02)
    assert tb.stats().idle_workers == 1
    assert await tb.run_killable(targets.add, 1, 2, backend=P) == 3


async def test_multiprocessing_grandchild_dies_at_rung3(tmp_path: Path) -> None:
    """A multiprocessing.Process started by the target dies with the worker's group."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=0.1)
    handle = tb.spawn(targets.mp_grandchild, str(path), backend=P, policy=policy)
    (line,) = await lines_of(path, 1)
    grandchild = int(line)
    assert await handle.stop() is tb.Stage.KILLED
    with anyio.fail_after(10):
        while not gone(grandchild):
            await anyio.sleep(0.01)


async def test_unreapable_worker_never_delays_another_ladder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed worker that is not reaped within the bound is logged as an error and
    counted in stats(), its handle ends KILLED, and meanwhile another handle's ladder
    climbs as usual: reaping never runs on the ladder's scheduler."""
    from threadbridge import _worker_process

    reaping, bound_passed, reaped_late = threading.Event(), threading.Event(), threading.Event()
    real_reap = _worker_process.WorkerProcess._reap

    def stuck(self: _worker_process.WorkerProcess, timeout: float | None) -> int | None:
        if timeout is not None:  # the bounded reap: as if the process were stuck
            reaping.set()
            bound_passed.wait(30)
            return None
        reaped_late.wait(30)  # the unbounded one that follows, in the same thread
        return real_reap(self, None)

    monkeypatch.setattr(_worker_process.WorkerProcess, "_reap", stuck)
    path = tmp_path / "pid"
    policy = tb.Policy(grace=0, interrupt=False)
    handle = tb.spawn(targets.write_pid_then_sleep, str(path), 30, backend=P, policy=policy)
    await lines_of(path, 1)
    handle.cancel()
    await anyio.to_thread.run_sync(reaping.wait)
    # The reaper is stuck; another handle's ladder still climbs rung by rung.
    started = threading.Event()

    def spin() -> None:
        started.set()
        while True:
            pass

    other = tb.spawn(spin, policy=tb.Policy(grace=0.01, interrupt_grace=30))
    await anyio.to_thread.run_sync(started.wait)
    with anyio.fail_after(10):  # far less than the 30 s the reaper is stuck for
        assert await other.stop() is tb.Stage.INTERRUPTED
    assert reaping.is_set()
    assert not bound_passed.is_set()
    assert handle.stage is tb.Stage.RUNNING  # reported once the bound has passed
    bound_passed.set()
    assert await handle.stop() is tb.Stage.KILLED
    assert tb.stats().unreaped_workers == 1
    assert any(
        r.levelname == "ERROR" and "did not end within" in r.getMessage() for r in caplog.records
    )
    reaped_late.set()
    with anyio.fail_after(10):
        while tb.stats().unreaped_workers:
            await anyio.sleep(0.01)


async def test_exception_that_tblib_cannot_carry_comes_back_as_itself() -> None:
    """An exception tblib alone fails on (a frozen dataclass) comes back as its own type,
    with the worker's traceback, not as a RemoteError."""
    with pytest.raises(targets.FrozenError) as info:
        await tb.run_killable(targets.raise_frozen, backend=P)
    text = "".join(traceback.format_exception(info.value))
    assert "raise_frozen" in text


@pytest.fixture(scope="module")
def resource_tracker() -> None:
    """multiprocessing's resource tracker: started once per process, and kept (with a
    pipe to it) for good; started here so that no test counts it as its leak."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


@pytest.mark.usefixtures("resource_tracker")
async def test_manager_proxies_work_in_workers() -> None:
    """Workers share the parent's multiprocessing authkey: a Manager's proxies work in
    targets, as they do in multiprocessing's own pools."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        await tb.run_killable(targets.set_in_proxy, shared, "answer", 42, backend=P)
        assert shared["answer"] == 42


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_graceful_shutdown_runs_atexit_handlers(tmp_path: Path, loop: str) -> None:
    """When the loop ends, idle workers exit like Python programs: atexit handlers run and
    buffered output is flushed."""
    path = tmp_path / "atexit"

    async def main() -> None:
        await tb.run_killable(targets.register_atexit, str(path), backend=P)

    anyio.run(main, backend=loop)
    assert path.read_text().strip() == "atexit ran"


async def test_own_sigterm_handler_ended_by_rung2_is_interrupted(tmp_path: Path) -> None:
    """A target whose own SIGTERM handler ends it when rung 2 comes is INTERRUPTED."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    handle = tb.spawn(targets.own_sigterm_handler, str(path), backend=P, policy=policy)
    await lines_of(path, 1)
    assert await handle.stop() is tb.Stage.INTERRUPTED


async def test_sys_exit_code_and_recursion_error_arrive_as_themselves() -> None:
    """sys.exit(3) arrives as SystemExit with code 3; RecursionError as RecursionError."""
    with pytest.raises(SystemExit) as info:
        await tb.run_killable(targets.exit_code, 3, backend=P)
    assert info.value.code == 3
    with pytest.raises(RecursionError):
        await tb.run_killable(targets.recurse, backend=P)
    assert await tb.run_killable(targets.add, 1, 2, backend=P) == 3


async def test_worker_pipes_are_not_inherited_by_the_targets_children() -> None:
    """A program a target starts, even with close_fds=False, gets none of the worker's
    private pipes (it could otherwise write a forged answer, or hold the pipe open)."""
    assert await tb.run_killable(targets.pipes_a_child_inherits, backend=P) == []


async def test_one_standby_after_a_burst_of_kills(tmp_path: Path) -> None:
    """After several workers are killed at once, the pool keeps one standby, not more."""
    policy = tb.Policy(grace=0, interrupt=False)
    limiter = anyio.CapacityLimiter(4)
    handles = [
        tb.spawn(
            targets.write_pid_then_sleep,
            str(tmp_path / str(i)),
            60,
            backend=P,
            policy=policy,
            limiter=limiter,
        )
        for i in range(4)
    ]
    for i in range(4):
        await lines_of(tmp_path / str(i), 1)
    async with anyio.create_task_group() as tg:
        for handle in handles:
            tg.start_soon(handle.stop)
    assert all(h.stage is tb.Stage.KILLED for h in handles)
    # Let every reaper and standby starter finish, then count.
    await wait_for_pool_threads()
    assert tb.stats().standby_workers == 1


async def test_signal_state_does_not_leak_to_the_next_job(tmp_path: Path) -> None:
    """A target that leaves SIGTERM blocked and ignored does not disable rung 2 for the
    next target on the same worker."""
    limiter = anyio.CapacityLimiter(1)  # one worker at a time: the same one, reused
    pid = await tb.run_killable(targets.pid, backend=P, limiter=limiter)
    await tb.run_killable(targets.block_sigterm, backend=P, limiter=limiter)
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    handle = tb.spawn(
        targets.write_pid_then_sleep, str(path), 60, backend=P, policy=policy, limiter=limiter
    )
    (line,) = await lines_of(path, 1)
    assert int(line) == pid  # on the worker the careless target had used
    with anyio.fail_after(10):
        assert await handle.stop() is tb.Stage.INTERRUPTED


@pytest.mark.parametrize("call", ["read", "lock"])
async def test_sigterm_restarting_calls_does_not_leak_to_the_next_job(
    tmp_path: Path, call: str
) -> None:
    """A target that leaves SIGTERM restarting system calls (signal.siginterrupt(SIGTERM,
    False)) does not disable rung 2 for the next target on the same worker: blocked in a
    read or a lock, that one still gets TargetCancelled, and its finally runs."""
    limiter = anyio.CapacityLimiter(1)  # one worker at a time: the same one, reused
    pid = await tb.run_killable(targets.pid, backend=P, limiter=limiter)
    await tb.run_killable(targets.restart_after_sigterm, backend=P, limiter=limiter)
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=10)
    handle = tb.spawn(targets.blocks_in, str(path), call, backend=P, policy=policy, limiter=limiter)
    (line,) = await lines_of(path, 1)
    assert int(line) == pid  # on the worker the careless target had used
    with anyio.fail_after(30):
        assert await handle.stop() is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines() == [line, "finally"]


@pytest.mark.parametrize("sigtimedwait", [True, False], ids=["linux", "without-sigtimedwait"])
def test_no_sigpipe_when_writing_to_a_dead_worker(sigtimedwait: bool) -> None:
    """In a program that restored SIGPIPE's default action, a write to a dead worker is a
    BrokenPipeError, handled, never a SIGPIPE that kills the program (also where the
    signal module has no sigtimedwait, as on macOS)."""
    take_away = "" if sigtimedwait else "del signal.sigtimedwait, _signal.sigtimedwait"
    code = textwrap.dedent(
        f"""
        import os, signal, _signal
        {take_away}
        from threadbridge import _wire, _worker_io
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        r, w = os.pipe()
        os.close(r)
        try:
            _worker_io.write_frame(w, _wire.EXIT)
        except BrokenPipeError:
            print("BrokenPipeError")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "BrokenPipeError")


async def test_interrupted_target_leaves_no_process_behind(tmp_path: Path) -> None:
    """After rung 2, the target's children (one ignoring SIGTERM, one killed by it and
    left a zombie) are gone: the worker's group is finished off before the await
    returns, and the pool goes on with its standby."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    handle = tb.spawn(targets.children_then_sleep, str(path), backend=P, policy=policy)
    (line,) = await lines_of(path, 1)
    children = [int(pid) for pid in line.split()]
    assert await handle.stop() is tb.Stage.INTERRUPTED
    with anyio.fail_after(2):  # SIGKILL was sent before the await returned
        while not all(gone(pid) for pid in children):
            await anyio.sleep(0.005)
    assert await tb.run_killable(targets.add, 2, 5, backend=P) == 7


@pytest.mark.threadbridge_loop_end_expected  # what it tests
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_loop_end_runs_the_ladder_for_busy_workers(tmp_path: Path, loop: str) -> None:
    """A loop that ends with a target still running in a worker stops it through the
    ladder (its finally runs) and its handle says how it really ended."""
    path = tmp_path / "log"
    handles: list[tb.Handle[None]] = []

    async def main() -> None:
        handles.append(tb.spawn(targets.blocking_sleeper, str(path), backend=P))
        await lines_of(path, 1)

    anyio.run(main, backend=loop)
    assert handles[0].stage is tb.Stage.INTERRUPTED
    assert path.read_text().split() == ["started", "TargetCancelled", "finally"]


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
def test_parent_death_with_a_forked_child_still_kills_the_worker(
    tmp_path: Path, runner: str
) -> None:
    """SIGKILL a parent that forked a child of its own: the child does not keep the
    parent's busy worker alive (it closed its copies of the worker's pipes)."""
    path, fork_path = tmp_path / "log", tmp_path / "fork"
    code = textwrap.dedent(
        f"""
        import os, sys, time, anyio, threadbridge as tb
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests import targets
        async def main():
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: tb.run_killable(
                    targets.ignores_sigterm_with_grandchild, {str(path)!r}, backend="process"))
                while not os.path.exists({str(path)!r}) or not open({str(path)!r}).read().strip():
                    await anyio.sleep(0.01)
                pid = os.fork()
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                with open({str(fork_path)!r}, "w") as f:
                    f.write(str(pid))
        anyio.run(main, backend={runner!r})
        """
    )
    parent = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code])
    fork = 0
    try:
        wait_for_text(fork_path, "the parent never forked")
        fork = int(fork_path.read_text())
        kill_parent_then_check_worker_gone(parent, path)
    finally:
        parent.kill()
        parent.wait()
        if fork:
            with contextlib.suppress(ProcessLookupError):
                os.kill(fork, signal.SIGKILL)


async def test_pickling_that_raises_base_exceptions() -> None:
    """Results and exceptions whose pickling or unpickling raises SystemExit come back as
    clear errors; the worker lives on and the call never hangs."""
    limiter = anyio.CapacityLimiter(1)
    pid = await tb.run_killable(targets.pid, backend=P, limiter=limiter)
    with anyio.fail_after(10):
        with pytest.raises(TypeError, match="cannot be pickled"):
            await tb.run_killable(targets.return_exits_when_pickled, backend=P, limiter=limiter)
        with pytest.raises(TypeError, match="cannot be unpickled"):
            await tb.run_killable(targets.return_exits_when_loaded, backend=P, limiter=limiter)
        with pytest.raises(tb.RemoteError, match="HostileError"):
            await tb.run_killable(targets.raise_hostile, backend=P, limiter=limiter)
    assert await tb.run_killable(targets.pid, backend=P, limiter=limiter) == pid


async def test_out_of_descriptors_while_starting_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Running out of file descriptors half-way through starting a worker gives the caller
    the OSError and leaves no descriptor open (the suite checks the count)."""
    import errno

    real_pipe = os.pipe
    made: list[int] = []

    def pipe() -> tuple[int, int]:
        if len(made) == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        made.append(1)
        return real_pipe()

    monkeypatch.setattr(os, "pipe", pipe)
    with pytest.raises(OSError, match="Too many open files"):
        await tb.run_killable(targets.add, 1, 1, backend=P)
    monkeypatch.setattr(os, "pipe", real_pipe)
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


def past_select_limit_pipes() -> list[int]:
    """This process's pipe descriptors numbered 1024 or more."""
    listing = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    found = []
    for fd in (int(name) for name in os.listdir(listing)):
        try:
            if fd >= 1024 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                found.append(fd)
        except OSError:  # closed in the meantime
            pass
    return found


async def test_descriptors_numbered_past_select_limit(tmp_path: Path) -> None:
    """In a service with over a thousand open descriptors, a worker's pipes are numbered
    past 1024, out of select()'s reach: calls, a worker that exits on its own and a kill
    at rung 3 all still work."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1400
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard descriptor limit ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    held: list[int] = []
    try:
        while len(held) < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        async with tb.ProcessPool(1) as pool:
            assert await tb.run_killable(targets.add, 1, 1, backend=pool) == 2
            with pytest.raises(tb.WorkerCrashed) as info:
                await tb.run_killable(targets.exit_with, 3, backend=pool)
            assert info.value.exitcode == 3
            path = tmp_path / "pid"
            policy = tb.Policy(grace=0, interrupt=False)
            handle = tb.spawn(
                targets.write_pid_then_sleep, str(path), 60, backend=pool, policy=policy
            )
            (worker,) = await lines_of(path, 1)
            assert not gone(int(worker))
            assert past_select_limit_pipes(), "the test meant the worker's pipes past 1024"
            assert await handle.stop() is tb.Stage.KILLED
            assert gone(int(worker))
            assert await tb.run_killable(targets.add, 2, 2, backend=pool) == 4
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# For the scripts below: a target that says when it runs, and a stop that waits for that.
STOP_ONCE_STARTED = """

def sleep_after_writing(path):
    with open(path, "w") as f:
        f.write("started")
    time.sleep(60)


async def stop_once_started(path, policy):
    handle = tb.spawn(sleep_after_writing, path, backend="process", policy=policy)
    while not os.path.exists(path):
        await anyio.sleep(0.01)
    return (await handle.stop()).value
"""


SIGCHLD_IGNORED = """
import json, os, signal, subprocess, sys, time
import anyio
import threadbridge as tb
"""
SIGCHLD_IGNORED += STOP_ONCE_STARTED
SIGCHLD_IGNORED += """


def crash():
    os._exit(3)


def child_exit_code():
    return subprocess.run([sys.executable, "-c", "raise SystemExit(5)"]).returncode


async def main():
    tb.set_start_method(sys.argv[2])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    out = {}
    with anyio.fail_after(60):
        out["add"] = await tb.run_killable(int.__add__, 1, 2, backend="process")
        out["child"] = await tb.run_killable(child_exit_code, backend="process")
        try:
            await tb.run_killable(crash, backend="process")
        except tb.WorkerCrashed as exc:
            out["crash"] = [exc.exitcode, exc.signal, str(exc)]
        policy = tb.Policy(grace=0, interrupt=False)
        out["stage"] = await stop_once_started(sys.argv[3], policy)
        out["after"] = await tb.run_killable(int.__add__, 2, 2, backend="process")
    print(json.dumps(out))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_parent_that_ignores_sigchld(tmp_path: Path, loop: str, method: str) -> None:
    """A program that ignores SIGCHLD (so that the system reaps its children, keeping no
    exit status): calls, a crash, a kill and the next call all work; a crash of a worker
    of its own says that its exit status is unknown, and why; targets' own children keep
    their exit codes (workers do not inherit the ignored SIGCHLD)."""
    script = tmp_path / "ignores_sigchld.py"
    script.write_text(SIGCHLD_IGNORED)
    done = subprocess.run(
        [sys.executable, str(script), loop, method, str(tmp_path / "started")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["add"] == 3
    assert out["child"] == 5
    exitcode, signum, message = out["crash"]
    assert signum is None
    if method == "forkserver":  # its workers are the server's children: it reads the code
        assert exitcode == 3
    else:
        assert exitcode is None
        assert "SIGCHLD is ignored" in message
    assert out["stage"] == "killed"
    assert out["after"] == 4


@pytest.mark.parametrize("method", _spawn.START_METHODS)
async def test_targets_follow_the_parents_directory_path_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A worker started before the parent changed directory, added to sys.path or changed
    its environment runs its next target with the parent's new ones, as a thread would: a
    module the parent imported from the new path is found, relative paths mean the same
    thing, and os.environ says what the parent's says."""
    monkeypatch.setenv("THREADBRIDGE_TEST_GONE", "set before the worker started")
    async with tb.ProcessPool(1, start_method=method) as pool:
        assert await tb.run_killable(os.getcwd, backend=pool) == os.getcwd()
        assert await tb.run_killable(os.getenv, "THREADBRIDGE_TEST_GONE", backend=pool)
        monkeypatch.setenv("THREADBRIDGE_TEST_NEW", "set later")
        monkeypatch.delenv("THREADBRIDGE_TEST_GONE")
        assert await tb.run_killable(os.getenv, "THREADBRIDGE_TEST_NEW", backend=pool) == (
            "set later"
        )
        assert await tb.run_killable(os.getenv, "THREADBRIDGE_TEST_GONE", backend=pool) is None
        folder = tmp_path / "added"
        folder.mkdir()
        name = f"added_later_{os.getpid()}_{id(pool)}"
        (folder / f"{name}.py").write_text("import os\n\ndef where():\n    return os.getcwd()\n")
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.chdir(tmp_path)
        module = __import__(name)
        try:
            assert await tb.run_killable(module.where, backend=pool) == str(tmp_path)
            assert await tb.run_killable(os.path.exists, "added", backend=pool)
        finally:
            sys.modules.pop(name, None)


FLAGS_SCRIPT = """
import json, sys
import anyio
import threadbridge as tb


def flags():
    return [sys.flags.optimize, list(sys.warnoptions), sys.flags.ignore_environment]


async def main():
    tb.set_start_method(sys.argv[2])
    async with tb.ProcessPool(1) as pool:
        worker = await tb.run_killable(flags, backend=pool)
    print(json.dumps({"parent": flags(), "worker": worker}))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_workers_take_the_interpreters_flags(tmp_path: Path, loop: str, method: str) -> None:
    """A program run with -O, -W or -E has workers run with them too, as multiprocessing's
    children do: asserts are off there as well, and warnings filtered the same way."""
    script = tmp_path / "flags.py"
    script.write_text(FLAGS_SCRIPT)
    command = [sys.executable, "-O", "-W", "error::UserWarning", str(script), loop, method]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["parent"][0] == 1
    assert "error::UserWarning" in out["parent"][1]
    assert out["worker"] == out["parent"]


MASKED_SCRIPT = """
import json, os, signal, sys, time
import anyio
import threadbridge as tb
"""
MASKED_SCRIPT += STOP_ONCE_STARTED
MASKED_SCRIPT += """


async def main():
    tb.set_start_method(sys.argv[2])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    policy = tb.Policy(grace=0, interrupt_grace=30)
    out = []
    with anyio.fail_after(60):
        for round in range(2):  # a fresh worker, then the standby started beside it
            stage = await stop_once_started(f"{sys.argv[3]}-{round}", policy)
            out.append([stage, tb.stats().unreaped_workers])
    print(json.dumps(out))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_parent_that_blocks_signals(tmp_path: Path, loop: str, method: str) -> None:
    """A program that blocks SIGTERM and SIGCHLD in its threads (a service that takes its
    signals with sigwait) passes its mask on to what it starts, even through exec. Rung 2
    still lands in its workers (they unblock SIGTERM), and a fork server still hears of its
    workers' exits (it unblocks SIGCHLD): no stop waits out a reaping bound."""
    script = tmp_path / "blocks_signals.py"
    script.write_text(MASKED_SCRIPT)
    command = [sys.executable, str(script), loop, method, str(tmp_path / "started")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["interrupted", 0], ["interrupted", 0]]
    assert "did not end within" not in done.stderr


BUFFERED_OUTPUT_SCRIPT = """
import sys
import anyio
import threadbridge as tb


def to_stderr(text):
    print(text, file=sys.stderr)


async def main():
    tb.set_start_method(sys.argv[2])
    sys.stdout.write("the parent wrote this;")  # buffered: not flushed before the fork
    sys.stderr.write("the parent's partial line;")
    await tb.run_killable(print, "the worker wrote this", backend="process")
    await tb.run_killable(to_stderr, "and this", backend="process")
    sys.stdout.write("the end")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_output_the_parent_had_not_flushed_is_written_once(
    tmp_path: Path, loop: str, method: str
) -> None:
    """A worker forked while the parent's sys.stdout and sys.stderr hold output not yet
    flushed does not write that output again when it exits (it came out twice); what the
    worker itself prints comes out once."""
    script = tmp_path / "buffered_output.py"
    script.write_text(BUFFERED_OUTPUT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    command = [sys.executable, str(script), loop, method]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        ["the worker wrote this", "the parent wrote this;the end"]
    )
    assert done.stderr.count("the parent's partial line;") == 1, done.stderr
    assert done.stderr.count("and this") == 1, done.stderr


LIKE_OLD_MACOS = """
import json, os, signal, sys, time
import _signal

# What macOS lacks before Python 3.13 (os.waitid), and always (sigtimedwait, pidfd_open).
for module, names in ((os, ["waitid", "pidfd_open"]), (signal, ["sigtimedwait"]),
                      (_signal, ["sigtimedwait"])):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)

import anyio
import threadbridge as tb
"""
LIKE_OLD_MACOS += STOP_ONCE_STARTED
LIKE_OLD_MACOS += """

async def main():
    out = {}
    with anyio.fail_after(60):
        out["calls"] = [await tb.run_killable(int.__add__, i, 1, backend="process")
                        for i in range(3)]
        try:
            await tb.run_killable(os._exit, 3, backend="process")
        except tb.WorkerCrashed as exc:
            out["crash"] = exc.exitcode
        policy = tb.Policy(grace=0, interrupt=False)
        out["stop"] = await stop_once_started(sys.argv[2], policy)
        out["after"] = await tb.run_killable(int.__add__, 2, 2, backend="process")
    try:
        tb.set_start_method("forkserver")
    except ValueError as exc:
        out["forkserver"] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_platform_like_macos_before_313(tmp_path: Path, loop: str) -> None:
    """Without os.waitid (macOS before Python 3.13), sigtimedwait or pidfds: warm workers
    serve call after call (the second call failed), a crash and a kill are reported, and
    the "forkserver" start method, which needs waitid, is refused with the reason."""
    script = tmp_path / "like_old_macos.py"
    script.write_text(LIKE_OLD_MACOS)
    command = [sys.executable, str(script), loop, str(tmp_path / "started")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["calls"] == [1, 2, 3]
    assert out["crash"] == 3
    assert out["stop"] == "killed"
    assert out["after"] == 4
    assert "os.waitid" in out["forkserver"]


PATHS_OF_ITS_OWN = """
import json, sys

# A program that finds its libraries itself (vendored, embedded): run with -S, no
# site-packages is on sys.path until it puts them there.
sys.path[:0] = json.loads(sys.argv[3])
import anyio
import threadbridge as tb


def where():
    return tb.__name__


async def main():
    tb.set_start_method(sys.argv[2])
    async with tb.ProcessPool(1) as pool:
        print(json.dumps(await tb.run_killable(where, backend=pool)))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("method", _spawn.START_METHODS)
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_program_that_finds_threadbridge_on_a_path_of_its_own(
    tmp_path: Path, loop: str, method: str
) -> None:
    """A worker boots from the folder the parent imported threadbridge from, even where
    a new interpreter would not find it (there, every call failed with WorkerCrashed and
    "No module named 'threadbridge'" on stderr)."""
    # threadbridge's folder, and the one of its dependencies (anyio, trio, sniffio...).
    files = [m.__file__ for m in (tb, anyio) if m.__file__]
    folders = sorted({str(Path(file).resolve().parent.parent) for file in files})
    script = tmp_path / "paths_of_its_own.py"
    script.write_text(PATHS_OF_ITS_OWN)
    command = [sys.executable, "-S", str(script), loop, method, json.dumps(folders)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == "threadbridge"


async def test_empty_sys_executable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedded interpreter may have no sys.executable: starting a worker says so and
    what to do (it was "Permission denied: ''"), and leaves the pool able to serve once it
    is set."""
    real = sys.executable
    async with tb.ProcessPool(1, start_method="spawn") as pool:
        monkeypatch.setattr(sys, "executable", "")
        with pytest.raises(RuntimeError, match=r"sys\.executable, which is empty"):
            await tb.run_killable(int.__add__, 1, 2, backend=pool)
        monkeypatch.setattr(sys, "executable", real)
        assert await tb.run_killable(int.__add__, 1, 2, backend=pool) == 3
