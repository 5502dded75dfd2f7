"""Faults: workers dying mid-answer, pipes closed, forking targets, the GIL, Ctrl-C."""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import anyio
import anyio.lowlevel
import psutil
import pytest

import threadbridge as tb
from threadbridge._backend import Backend, resolve
from threadbridge._ladder import Run, Work

from . import targets
from .helpers import (
    QuietRun,
    forked_child_exit_code,
    pool_threads_cannot_start,
    wait_for_pool_threads,
    worker_of,
)
from .test_process import lines_of

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

P: Literal["process"] = "process"
# False on a free-threaded build running without its GIL (PYTHON_GIL=0).
GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()
ROOT = str(Path(__file__).parent.parent)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.anyio
async def test_worker_killed_while_sending_its_result() -> None:
    """Half an answer then death: WorkerCrashed, nothing misread, the pool goes on."""
    with pytest.raises(tb.WorkerCrashed) as info:
        await tb.run_killable(targets.die_while_answering, backend=P)
    assert info.value.signal == signal.SIGKILL
    assert await tb.run_killable(targets.add, 2, 2, backend=P) == 4


@pytest.mark.anyio
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists /proc/self/fd")
@pytest.mark.parametrize(
    "target", [targets.closes_every_descriptor, targets.replaces_every_descriptor]
)
async def test_target_that_closes_the_workers_pipes(target: Callable[[], str]) -> None:
    """A target that closes or replaces the worker's own descriptors: WorkerCrashed that
    says so and what to do (it said "killed by SIGKILL", as if by the OOM killer, or
    "exited with code 0"), and the pool goes on."""
    with pytest.raises(tb.WorkerCrashed, match="closed or replaced file descriptors") as info:
        await tb.run_killable(target, backend=P)
    # The worker exits with the status that says why, unless it has not ended a second
    # after its pipe closed (a very busy machine): then it was killed.
    assert (info.value.exitcode, info.value.signal) in [(74, None), (None, signal.SIGKILL)]
    assert await tb.run_killable(targets.add, 2, 2, backend=P) == 4


@pytest.mark.anyio
async def test_control_pipe_closed_under_busy_worker() -> None:
    """A busy worker whose control pipe closes takes itself down at once (it cannot be
    told to stop any more): WorkerCrashed, and the pool goes on."""
    handle = tb.spawn(time.sleep, 10, backend=P)
    pipes = worker_of(handle).pipes
    os.close(pipes.control_fd)
    pipes.control_fd = os.open(os.devnull, os.O_WRONLY)  # so that cleanup closes something
    with anyio.fail_after(5):  # far less than the target's own 10 s
        with pytest.raises(tb.WorkerCrashed):
            await handle
    assert await tb.run_killable(targets.add, 2, 2, backend=P) == 4


@pytest.mark.anyio
async def test_job_pipe_closed_by_the_parent() -> None:
    """If the parent's end of a busy worker's job pipe closes, the answer still comes
    back; the worker then exits and a standby serves the next call."""
    handle = tb.spawn(time.sleep, 0.3, backend=P)
    worker = worker_of(handle)
    os.close(worker.pipes.job_fd)
    worker.pipes.job_fd = os.open(os.devnull, os.O_WRONLY)  # so that cleanup closes something
    await handle  # the answer still comes back
    assert handle.stage is tb.Stage.FINISHED
    with anyio.fail_after(10):
        while not worker.exited():  # exited for good, not a leader thread that is exiting
            await anyio.sleep(0.01)
    assert await tb.run_killable(targets.add, 2, 2, backend=P) == 4


@pytest.mark.anyio
@pytest.mark.parametrize("child_returns", [False, True])
async def test_target_that_forks(child_returns: bool) -> None:
    """A target's fork never answers for the worker, even if the child returns."""
    result = await tb.run_killable(targets.fork_and_return, child_returns, backend=P)
    assert result == "from the worker"
    for _ in range(3):
        assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


def test_grandchild_of_a_normal_return_lives_until_the_worker_exits() -> None:
    """A target that starts a child and returns leaves it running in the worker's
    process group; it is killed when the worker exits (here: the loop ends)."""

    async def main() -> int:
        child = await tb.run_killable(targets.spawn_grandchild_and_return, "", backend=P)
        assert not gone(child), "the child runs on after the target returned"
        return child

    for backend in ("asyncio", "trio"):
        child = anyio.run(main, backend=backend)
        deadline = time.monotonic() + 10
        while not gone(child):
            assert time.monotonic() < deadline, "the child outlived its worker"
            time.sleep(0.01)


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["thread", "process"])
async def test_long_c_call_freezes_loop_only_for_threads(
    backend: Literal["thread", "process"],
) -> None:
    """A C call that holds the GIL freezes the event loop too when run in a thread;
    in a worker process the loop keeps ticking, and in a thread where there is no GIL
    (a free-threaded build)."""
    n = 30_000_000
    ticks: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        ticks.append(time.perf_counter())
        while not done.is_set():
            await anyio.sleep(0.005)
            ticks.append(time.perf_counter())

    await tb.run_killable(targets.add, 0, 0, backend=backend)  # warm up
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.wait_all_tasks_blocked()  # the ticker is ticking
        cpu, start, end = await tb.run_killable(targets.timed_c_call, n, backend=backend)
        done.set()
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
    if backend == "thread" and GIL:
        # The GIL was held for at least the call's CPU time, whatever else the machine
        # did: the loop could not tick for that long.
        assert max(gaps) >= 0.95 * cpu, "the loop should have been frozen"
    else:
        # Ticked while the call ran (a loaded machine may still hold the loop back for
        # a while: how long it ticks between is not what is asked).
        assert any(start < tick < end for tick in ticks), "the loop should have kept ticking"


SIGINT_PROGRAM = """
import signal, sys, anyio, threadbridge as tb
# As in a terminal: a shell starts background jobs with SIGINT ignored, and a test suite
# may run from one.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {root!r})
from tests import targets
async def main():
    print(await tb.run_killable(targets.pid, backend="process"), flush=True)
    await tb.run_killable(targets.{target}, {path!r}, backend={backend!r})
{runner}
"""

RUNNERS = {
    "asyncio": "import asyncio; asyncio.run(main())",
    "trio": "import trio; trio.run(main)",
}


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
@pytest.mark.parametrize(
    ("backend", "target"), [("thread", "tb_sleeper"), ("process", "blocking_sleeper")]
)
def test_sigint_ends_program_promptly(
    tmp_path: Path, runner: str, backend: str, target: str
) -> None:
    """Ctrl-C during run_killable: KeyboardInterrupt, workers gone, only a traceback."""
    path = tmp_path / "log"
    code = SIGINT_PROGRAM.format(
        root=ROOT, target=target, path=str(path), backend=backend, runner=RUNNERS[runner]
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        deadline = time.monotonic() + 30
        while not path.exists() or "started" not in path.read_text():
            assert time.monotonic() < deadline, "the target never started"
            time.sleep(0.01)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert elapsed < 5, "a cooperative stop or SIGTERM should end it well within 5 s"
    assert err.startswith("Traceback"), err
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert "Warning" not in err, err
    assert "threadbridge:" not in err, err
    assert gone(worker)


def test_frames_carry_lengths_over_4_gib() -> None:
    """The framing's length field is 64 bits: a job over 4 GiB is framed, not refused by
    a writer thread that dies with struct.error (the call then waited for ever)."""
    from threadbridge import _wire

    size = 5 * 2**30
    header = _wire.HEADER.pack(size, _wire.RUN, 7)
    parser = _wire.FrameParser()
    assert parser.feed(header + b"x" * 10) == []  # waits for the rest of the payload
    assert _wire.HEADER.unpack(header) == (size, _wire.RUN, 7)


def test_frame_parser_says_how_much_completes_a_frame() -> None:
    """The parent reads small answers with small reads, and a large one in big pieces:
    the parser says how many bytes the frame under way still needs."""
    from threadbridge import _wire

    parser = _wire.FrameParser()
    assert parser.wanted() == _wire.HEADER.size
    frame = _wire.HEADER.pack(100_000, _wire.ANSWER, 1) + b"a" * 100_000
    assert parser.feed(frame[:5]) == []
    assert parser.wanted() == _wire.HEADER.size - 5
    assert parser.feed(frame[5:1000]) == []
    assert parser.wanted() == len(frame) - 1000
    assert parser.feed(frame[1000:]) == [(_wire.ANSWER, 1, b"a" * 100_000)]
    assert parser.wanted() == _wire.HEADER.size


class _InterruptedAfterHandover(Backend):
    """A backend, with a KeyboardInterrupt landing right after it has handed the target
    over (on asyncio one can land between any two bytecodes)."""

    name = "then Ctrl-C"

    def __init__(self, inner: str) -> None:
        self.inner = resolve(inner, "test")

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> object:
        return self.inner.prepare(func, args, name)

    def start(self, run: Run, job: Any) -> Work:
        self.inner.start(run, job)
        raise KeyboardInterrupt

    def default_limit(self) -> int:
        return 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("backend", "target", "logs"),
    [
        # Rung 1 wakes tb.sleep(); rung 2, 50 ms later on a machine too busy to run the
        # thread meanwhile, can land inside either mark() (outside the try for the first).
        ("thread", "tb_sleeper", [["started", "woke"], ["started"], []]),
        # Rung 2's SIGTERM, 50 ms after the cancel, lands wherever the worker is: in the
        # sleep, or (a worker that started the target late) inside its first mark().
        (
            "process",
            "blocking_sleeper",
            [["started", "TargetCancelled", "finally"], ["TargetCancelled", "finally"]],
        ),
    ],
)
async def test_keyboard_interrupt_after_the_handover_leaves_the_target_to_the_ladder(
    tmp_path: Path, backend: str, target: str, logs: list[list[str]]
) -> None:
    """A KeyboardInterrupt that lands once the target is handed over leaves it to the
    ladder: the target is stopped (not left running), its end is reported once, and its
    limiter token comes back once (the conftest fails a test on a second)."""
    path = tmp_path / "log"
    limiter = anyio.CapacityLimiter(1)
    policy = tb.Policy(grace=0.05, interrupt_grace=10)
    with pytest.raises(KeyboardInterrupt):
        await tb.run_killable(
            getattr(targets, target),
            str(path),
            backend=_InterruptedAfterHandover(backend),
            limiter=limiter,
            policy=policy,
        )
    with anyio.fail_after(20):
        # The ladder stops it (the targets sleep 60 s), then the token comes back.
        while tb.stats().busy_workers or tb.stats().busy_threads:
            await anyio.sleep(0.01)
        async with limiter:
            pass
    if path.exists():  # it may have been stopped before it started
        assert path.read_text().split() in logs


@pytest.mark.anyio
async def test_a_pool_thread_that_cannot_start_is_a_clear_error_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of threads: the call raises the error, the run is reported once (never run),
    its limiter token comes back once, and the next call works."""
    from threadbridge._thread import ThreadBackend

    backend = ThreadBackend()  # its own pool: no idle thread to reuse
    limiter = anyio.CapacityLimiter(1)
    pool_threads_cannot_start(monkeypatch)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await tb.run_killable(abs, -1, backend=backend, limiter=limiter)
    monkeypatch.undo()
    with anyio.fail_after(10):
        async with limiter:
            pass
    assert await tb.run_killable(abs, -2, backend=backend, limiter=limiter) == 2


def test_rung2_to_deliver_again_while_the_helper_thread_retires_is_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rung 2 dropped by CPython just as the idle helper thread that delivers it again
    decides to end: it is still delivered (a helper serves it, this one or a new one)."""
    from threadbridge import _inject

    delivered = threading.Event()

    class State:  # what the helper needs of a TargetState
        thread_id = -1  # no such thread: never inside the hook

        def deliver_again(self) -> None:
            delivered.set()

    class RacingQueue(queue.SimpleQueue):  # type: ignore[type-arg]
        raced = False

        def empty(self) -> bool:
            # The helper, idle, has found no work: the target's thread hands some over
            # right now, between that look and the helper's end.
            was_empty = super().empty()
            if not self.raced:
                self.raced = True
                _inject._redeliver(State())
            return was_empty

    def join_helpers() -> None:
        for thread in threading.enumerate():
            if thread.name == "threadbridge-redeliver":
                thread.join(10)
                assert not thread.is_alive()

    monkeypatch.setattr(_inject, "HELPER_IDLE", 0.01)
    join_helpers()  # one left idle by another test ends within its 5 s
    monkeypatch.setattr(_inject, "_queue", RacingQueue())
    _inject._redeliver(State())  # starts the helper thread, which delivers it
    assert delivered.wait(10)
    delivered.clear()
    assert delivered.wait(10), "the work handed over as the helper retired was lost"
    join_helpers()
    assert not _inject._helper_running


def test_worker_frame_reader_takes_frames_as_they_arrive() -> None:
    """The worker reads whatever has arrived in one read: two frames in one write, a
    frame split byte by byte across writes, a payload larger than one read, and the end
    of the pipe in the middle of a frame all come out right."""
    from threadbridge import _wire

    big = bytes(range(256)) * 4096  # 1 MiB: more than one read of the reader's
    frames = [(_wire.RUN, 1, b"first"), (_wire.RUN, 2, b""), (_wire.EXIT, 3, big)]
    data = b"".join(_wire.HEADER.pack(len(p), k, j) + p for k, j, p in frames)
    split = _wire.HEADER.pack(5, _wire.RUN, 4) + b"split"
    r, w = os.pipe()
    try:
        reader = _wire.FrameReader(r)

        def write_all() -> None:
            os.write(w, data[:40])  # the first frame, and part of the second header
            written = 40
            while written < len(data):
                written += os.write(w, data[written:])
            for i in range(len(split)):
                os.write(w, split[i : i + 1])
            os.write(w, _wire.HEADER.pack(10, _wire.RUN, 5) + b"cut")  # then EOF
            os.close(w)

        writer = threading.Thread(target=write_all)
        writer.start()
        got = [reader.read() for _ in range(4)]
        assert reader.read() is None
        writer.join()
    finally:
        os.close(r)
    assert got == [*frames, (_wire.RUN, 4, b"split")]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_gets_fresh_pools() -> None:
    """After the parent used both backends, a forked child runs its own calls (fresh
    thread pool, scheduler and process pool) instead of hanging."""

    async def parent() -> None:
        assert await tb.run_killable(abs, -1) == 1
        assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2

    async def child() -> None:
        with anyio.fail_after(20):
            assert await tb.run_killable(abs, -2) == 2
            # tb.sleep wakes at rung 1: a long grace costs nothing, and a loaded machine
            # must not turn a late wake-up into rung 2.
            handle = tb.spawn(tb.sleep, 60, policy=tb.Policy(grace=5))
            assert await handle.stop() is tb.Stage.COOPERATIVE
            assert await tb.run_killable(targets.add, 2, 2, backend=P) == 4

    anyio.run(parent, backend="asyncio")
    for backend in ("asyncio", "trio"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                anyio.run(child, backend=backend)
                code = 0
            finally:
                os._exit(code)
        assert forked_child_exit_code(pid, backend) == 0, backend


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_forked_child_leaves_the_parents_workers_alone(tmp_path: Path) -> None:
    """A forked child that exits normally (running threadbridge's exit handler) does not
    end the parent's workers: the parent's busy call still gets its answer."""
    from threadbridge import _pools

    gate = tmp_path / "gate"
    handle = tb.spawn(targets.busy_until_file, str(gate), backend=P)
    with anyio.fail_after(30):
        while not gate.exists():
            await anyio.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _pools._shutdown_all()  # what the child's normal exit runs
        finally:
            os._exit(0)
    await anyio.to_thread.run_sync(os.waitpid, pid, 0)
    Path(f"{gate}.go").touch()
    with anyio.fail_after(10):
        await handle
    assert handle.stage is tb.Stage.FINISHED
    assert await tb.run_killable(targets.add, 3, 3, backend=P) == 6


@pytest.mark.threadbridge_loop_end_expected  # what it tests
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_loop_that_ends_right_after_spawn(loop: str) -> None:
    """A loop that ends right after spawn() of a process target ends cleanly (the worker's
    reader, posted to a loop that takes no new tasks, is not an internal error)."""

    from threadbridge import _internal

    handles: list[tb.Handle[int]] = []

    async def main() -> None:
        handles.append(tb.spawn(targets.add, 1, 1, backend=P))

    violations = len(_internal.violations)
    for _ in range(10):
        anyio.run(main, backend=loop)  # raises if the loop did not end cleanly
    assert len(handles) == 10
    assert _internal.violations[violations:] == []  # no internal error either
    # Each call ended with its loop: it answered in time, or the loop's end stopped it
    # (through its ladder) before the loop was done.
    assert all(handle.done() for handle in handles), [handle.stage for handle in handles]


@pytest.mark.threadbridge_loop_end_expected  # what it tests
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize(
    ("policy", "stage", "lines"),
    [
        # No rung 2: the token (ignored), then rung 3 at once.
        (tb.Policy(grace=0, interrupt=False, interrupt_grace=0), tb.Stage.KILLED, ["started"]),
        # No rung 3: rung 2, then the target's own end, however long it takes (2 s
        # here; the pool's own grace for idle workers is 1 s).
        (
            tb.Policy(grace=0, interrupt_grace=0, force=False),
            tb.Stage.INTERRUPTED,
            ["started", "interrupted"],
        ),
    ],
)
def test_a_loop_that_ends_stops_its_process_calls_by_their_policy(
    tmp_path: Path, loop: str, policy: tb.Policy, stage: tb.Stage, lines: list[str]
) -> None:
    """A loop that ends with process calls in flight stops each through its own ladder:
    ``interrupt=False`` is never sent SIGTERM, ``force=False`` is never killed."""
    path = tmp_path / "log"
    handles: list[tb.Handle[str]] = []

    async def main() -> None:
        handles.append(
            tb.spawn(targets.sleeps_on_after_rung2, str(path), 2.0, backend=P, policy=policy)
        )
        await lines_of(path, 1)  # it runs: the loop ends now

    anyio.run(main, backend=loop)
    (handle,) = handles
    assert handle.done()  # the loop's end waited for it
    assert handle.stage is stage
    assert path.read_text().splitlines() == lines


@pytest.mark.anyio
async def test_worker_death_seen_while_a_fork_holds_its_pipes(tmp_path: Path) -> None:
    """A worker that dies while a process its target forked still holds the result pipe
    gives WorkerCrashed at once (its exit is watched, not only its pipe), and the fork is
    killed with the worker's group."""
    path = tmp_path / "fork"
    with anyio.fail_after(10):  # far less than the fork's 30 s
        with pytest.raises(tb.WorkerCrashed) as info:
            await tb.run_killable(targets.fork_then_crash, str(path), backend=P)
    assert info.value.exitcode == 3
    fork = int(path.read_text())
    with anyio.fail_after(5):
        while not gone(fork):
            await anyio.sleep(0.01)
    assert await tb.run_killable(targets.add, 1, 1, backend=P) == 2


@pytest.mark.anyio
async def test_a_tour_of_hostile_targets_leaves_nothing_behind(tmp_path: Path) -> None:
    """One bounded run of the hostile scenarios in a row, on one pool: afterwards no
    target runs, and no process, zombie or descriptor is left (checked here, and again by
    the suite's own leak checks)."""
    from threadbridge import testing

    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    # Helpers that other tests left for good (multiprocessing's resource tracker) are not ours.
    children_before = {c.pid for c in psutil.Process().children(recursive=True)}
    # The INTERRUPTED outcomes need rung 2 handled within interrupt_grace: a generous bound
    # on a loaded machine (only ignores_sigterm waits it out).
    policy = tb.Policy(grace=0.05, interrupt_grace=2)
    outcomes: list[str] = []

    async def scenario(name: str, func: Any, *args: Any, stop: bool = False) -> None:
        path = tmp_path / name
        try:
            if stop:
                handle = tb.spawn(func, str(path), *args, backend=P, policy=policy)
                with anyio.fail_after(30):
                    while not path.exists():
                        await anyio.sleep(0.01)
                    outcomes.append(f"{name}: {(await handle.stop()).name}")
            else:
                with anyio.fail_after(30):
                    await tb.run_killable(func, *args, backend=P, policy=policy)
                outcomes.append(f"{name}: returned")
        except (Exception, SystemExit) as exc:
            outcomes.append(f"{name}: {type(exc).__name__}")

    with anyio.fail_after(120):
        await scenario("fork_then_crash", targets.fork_then_crash, str(tmp_path / "fork"))
        await scenario("children", targets.children_then_sleep, stop=True)
        await scenario("own_handler", targets.own_sigterm_handler, stop=True)
        await scenario("ignores_sigterm", targets.ignores_sigterm_with_grandchild, stop=True)
        await scenario("block_sigterm", targets.block_sigterm)
        await scenario("exits_when_pickled", targets.return_exits_when_pickled)
        await scenario("exits_when_loaded", targets.return_exits_when_loaded)
        await scenario("hostile_error", targets.raise_hostile)
        await scenario("sys_exit", targets.exit_code, 3)
        await scenario("segfault", targets.segfault)
    assert outcomes == [
        "fork_then_crash: WorkerCrashed",
        "children: INTERRUPTED",
        "own_handler: INTERRUPTED",
        "ignores_sigterm: KILLED",
        "block_sigterm: returned",
        "exits_when_pickled: TypeError",
        "exits_when_loaded: TypeError",
        "hostile_error: RemoteError",
        "sys_exit: SystemExit",
        "segfault: WorkerCrashed",
    ]
    await testing.wait_all_ended(timeout=10)
    # Retired workers are reaped, and standbys started, by threads of their own: let them
    # finish (a worker being started shows the parent's command line until it execs).
    await wait_for_pool_threads()
    # What is left is the pool's idle workers, alive and waiting, and nothing else: no
    # child of a target, no zombie, no descriptor beyond the workers' pipes. A process in
    # the middle of exec or exit shows no command line for a moment (a standby whose timer
    # fired just now, a worker retiring): what is checked is what stays.
    seen: list[tuple[int, str, str]] = []
    with anyio.move_on_after(10):
        while True:
            stats = tb.stats()
            children = [
                c for c in psutil.Process().children(recursive=True) if c.pid not in children_before
            ]
            try:
                seen = [(c.pid, c.status(), " ".join(c.cmdline())) for c in children]
            except psutil.NoSuchProcess:
                seen = [(-1, "gone while looked at", "")]
            workers_only = all("threadbridge._in_worker" in cmdline for _, _, cmdline in seen)
            no_zombie = all(status != psutil.STATUS_ZOMBIE for _, status, _ in seen)
            if workers_only and no_zombie and len(seen) == stats.idle_workers:
                break
            await anyio.sleep(0.01)
    assert stats.active == 0
    assert all("threadbridge._in_worker" in cmdline for _, _, cmdline in seen), seen
    assert all(status != psutil.STATUS_ZOMBIE for _, status, _ in seen), seen
    assert len(seen) == stats.idle_workers, seen
    if fds_before:  # each idle worker: three pipes and a pidfd, at most
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 4 * stats.idle_workers


@pytest.mark.anyio
async def test_a_watcher_that_raises_is_reported_and_stops() -> None:
    """A descriptor watcher that raises (a bug of threadbridge's) is reported as an
    internal error and stops watching: never called again and again (asyncio), never a
    crashed run (trio)."""
    from threadbridge import _internal
    from threadbridge._loop import current_link

    link = current_link("test")
    read_fd, write_fd = os.pipe()
    calls = []
    called = anyio.Event()

    def watcher() -> bool:
        calls.append(1)
        called.set()
        raise ValueError("a bug")

    start = len(_internal.violations)
    try:
        assert link.watch_readable(read_fd, watcher, "test watcher")
        os.write(write_fd, b"x")  # stays readable: a watcher still watching would be called again
        with anyio.fail_after(10):
            await called.wait()
        # The loop goes round a few times; a watcher still registered would run on each.
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert calls == [1]
        found = _internal.violations[start:]
        assert len(found) == 1
        assert "test watcher raised" in found[0]
        assert "ValueError: a bug" in found[0]
    finally:
        del _internal.violations[start:]
        link.unwatch(read_fd)
        os.close(read_fd)
        os.close(write_fd)


def test_a_forked_worker_lists_its_descriptors_without_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where there is no /proc (macOS), a forked worker lists its open descriptors from
    /dev/fd, which names the same ones (it tried every number up to the limit, which may
    be "unlimited")."""
    from threadbridge import _in_worker

    with_proc = set(_in_worker._open_fds())
    real_listdir = os.listdir

    def listdir(path: str) -> list[str]:
        if path.startswith("/proc"):
            raise FileNotFoundError(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    without_proc = set(_in_worker._open_fds())
    # Each listing also saw the descriptor it read the folder through, closed since.
    assert {fd for fd in with_proc ^ without_proc if _is_open(fd)} == set()
    assert len([fd for fd in without_proc if not _is_open(fd)]) <= 1
    assert {0, 1, 2} <= without_proc


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class _Interrupt(BaseException):
    """What the timer's handler raises, wherever the main thread happens to be."""


def test_interrupts_while_submitting_leave_the_pool_counts_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signal handler that raises (Ctrl-C) can land between any two steps of handing
    a target to a pool thread. Thousands of such interrupts later, every handed-over run
    was reported exactly once, nothing counts as busy, and the idle count is the number
    of pool threads waiting: once idle threads retire, none is left behind."""
    from threadbridge import _stats, _thread

    monkeypatch.setattr(_thread, "IDLE_TIMEOUT", 0.2)  # threads retire during the test too
    backend = _thread.ThreadBackend()  # its own pool and threads
    pool = backend.pool
    ends: list[object] = []
    armed = False
    hits = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal armed, hits
        # Only in the code that hands the target over. (It can still land at the very
        # start of a weakref or gc callback called from there: CPython shows the handler
        # the caller's frame at that point, then reports and drops the exception. Those
        # reports are ours: the hook below drops them.)
        if armed and frame is not None and frame.f_code.co_filename in where:
            armed = False
            hits += 1
            raise _Interrupt

    where = {_thread.__file__, __file__}
    if sys.version_info < (3, 14):
        # On CPython 3.14 threading's own `with` statements can be left holding their
        # lock (gh-148874): an exception landing in Thread.start() can leave threading's
        # _active_limbo_lock held, and then no thread of the process can start again.
        # CPython's, not threadbridge's (docs/hazards.md); threadbridge's code is covered.
        where.add(threading.__file__)
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not _Interrupt:
            previous_hook(unraisable)

    monkeypatch.setattr(sys, "unraisablehook", hook)

    before = set(threading.enumerate())
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    runs: list[QuietRun] = []
    reported = threading.Semaphore(0)
    try:
        while hits < 1000 and len(runs) < 1_000_000:
            run = QuietRun(ends, reported)
            runs.append(run)
            try:
                armed = True
                backend.start(run, (abs, (-1,)))  # type: ignore[arg-type]
                armed = False
            except _Interrupt:
                pass
            except RuntimeError as exc:
                # Landing inside Thread.start()'s wait for the new thread, an interrupt
                # can leave that Condition's lock released twice: CPython's threading
                # is not safe against it either, and says so this way.
                if "release unlocked lock" not in str(exc):
                    raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        _stats.unregister(pool)
    attached = sum(run.attached for run in runs)
    for _ in range(attached):  # each attached run reports once
        assert reported.acquire(timeout=30), (len(ends), attached)
    assert hits >= 300, hits
    assert len(ends) == attached
    assert pool.counts()["busy_threads"] == 0, pool.counts()

    def alive_workers() -> list[threading.Thread]:
        # Interrupted inside Thread.start(), a Thread object can stay listed for ever
        # without ever having run (CPython's threading is not safe against it), or its
        # thread can begin to run late, once the main thread has moved on: alive ones.
        return [
            t
            for t in set(threading.enumerate()) - before
            if t.name == "threadbridge-worker" and t.is_alive()
        ]

    # Every thread that runs retires once idle; one that began late joins the idle ones
    # first. An idle thread that is not counted as idle would never retire (join fails),
    # and a count left over with no thread behind it never goes back to 0.
    deadline = time.monotonic() + 30
    while True:
        for thread in alive_workers():
            thread.join(timeout=10)
            assert not thread.is_alive()
        with pool.lock:
            counts = (pool.idle, pool.starting, dict(pool.pending))
        if counts == (0, 0, {}) or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # a thread whose start() was interrupted may not have run yet
    assert counts == (0, 0, {})


def test_a_thread_that_cannot_start_while_withdrawing_is_not_counted_as_coming(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Withdrawing a submit starts a thread for pending work that counted on the one
    withdrawn. If that thread cannot start either, it is not counted as coming: the next
    submit starts one, and every pending work runs."""
    from threadbridge import _stats, _thread

    backend = _thread.ThreadBackend()  # its own pool and threads
    pool = backend.pool
    ends: list[object] = []
    try:
        # Work submitted by another caller, queued, whose thread was the one withdrawn.
        reported = threading.Semaphore(0)
        waiting = _thread.ThreadWork(pool, QuietRun(ends, reported), abs, (-1,))  # type: ignore[arg-type]
        with pool.lock:
            pool.pending[waiting.key] = waiting
            waiting.submitted = True
        pool.queue.put(waiting.key)
        never_submitted = _thread.ThreadWork(pool, QuietRun(ends), abs, (-2,))  # type: ignore[arg-type]
        pool_threads_cannot_start(monkeypatch)
        assert pool.withdraw(never_submitted) is True
        assert pool.starting == 0
        monkeypatch.undo()
        backend.start(QuietRun(ends, reported), (abs, (-3,)))  # type: ignore[arg-type]
        for _ in range(2):  # the waiting work and the new one both run
            assert reported.acquire(timeout=10), ends
        assert len(ends) == 2
    finally:
        _stats.unregister(pool)
