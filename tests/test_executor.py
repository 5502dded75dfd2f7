"""threadbridge.Executor and Future: a concurrent.futures executor whose running calls
can be stopped, on threads and worker processes, with no event loop in the caller."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import gc
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadbridge as tb

from . import targets
from .helpers import (
    executor_loop_held,
    forked_child_exit_code,
    lines_soon,
    spin_forever,
    until_blocked_in_wait,
)

FAST = tb.Policy(grace=0.05, interrupt_grace=0.5)  # for work that only rung 3 ends
# Rung 2 soon, and all the time it needs to land (rung 3 only if it cannot): a loaded
# 2-core machine running six suites at once may not schedule a spinning thread for a while.
INTERRUPT = tb.Policy(grace=0.05, interrupt_grace=30)
SLOW = tb.Policy(grace=60, interrupt_grace=60)  # a ladder that stays at rung 1


@pytest.fixture(params=["thread", "process"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def test_submit_gives_a_future_with_the_result(backend: str) -> None:
    with tb.Executor(backend) as ex:
        future = ex.submit(targets.add, 1, b=2)
        assert isinstance(future, tb.Future)
        assert isinstance(future, cf.Future)
        assert future.result(timeout=30) == 3
        assert future.stage is tb.Stage.FINISHED
        assert future.wait_stopped(0)
        assert not future.cancel()  # finished: as a stdlib future, it refuses


def test_the_targets_exception_is_the_futures(backend: str) -> None:
    with tb.Executor(backend) as ex:
        future = ex.submit(targets.raise_custom, "no")
        with pytest.raises(targets.CustomError, match="no"):
            future.result(timeout=30)
        assert isinstance(future.exception(), targets.CustomError)
        assert future.stage is tb.Stage.FINISHED


def test_map_keeps_order_and_takes_lambdas(backend: str) -> None:
    offset = 10
    with tb.Executor(backend, max_workers=2) as ex:
        assert list(ex.map(targets.add, range(5), range(5))) == [0, 2, 4, 6, 8]
        assert list(ex.map(lambda x: x + offset, [1, 2])) == [11, 12]
        assert list(ex.map(targets.add, range(6), range(6), buffersize=2)) == [0, 2, 4, 6, 8, 10]


@pytest.mark.parametrize(
    ("target", "stage"),
    [(targets.spin_marked, tb.Stage.INTERRUPTED), (targets.cooperative, tb.Stage.COOPERATIVE)],
)
def test_cancel_of_a_running_call_climbs_the_ladder(
    backend: str, tmp_path: Path, target: Callable[[str], object], stage: tb.Stage
) -> None:
    """cancel() of a running future returns True and the future is cancelled at once;
    the work stops by the ladder, and the executor goes on."""
    path = tmp_path / "log"
    # A cooperative stop gets all the time it needs (a loaded 3.13t machine once took
    # longer than FAST's 0.05 s to let the target see its token, and rung 2 came).
    policy = INTERRUPT if stage is tb.Stage.INTERRUPTED else tb.Policy(grace=30)
    with tb.Executor(backend, policy=policy) as ex:
        future = ex.submit(target, str(path))
        lines_soon(path, 1)
        assert future.running()
        assert future.cancel() is True
        assert future.cancelled()
        assert future.done()
        assert future.wait_stopped(30)
        assert future.stage is stage
        if stage is tb.Stage.INTERRUPTED:  # where it was as rung 2 fired
            assert future.stopped_at is not None
            assert "in spin_marked\n" in future.stopped_at
        else:
            assert future.stopped_at is None
        with pytest.raises(cf.CancelledError):
            future.result()
        assert ex.submit(targets.add, 1, 1).result(30) == 2


def test_a_process_call_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with tb.Executor("process", policy=FAST) as ex:
        future = ex.submit(targets.ignore_term_marked, str(path))
        lines_soon(path, 1)
        assert future.cancel()
        assert future.wait_stopped(30)
        assert future.stage is tb.Stage.KILLED
        assert ex.submit(targets.add, 2, 2).result(30) == 4


@pytest.mark.anyio
async def test_a_thread_blocked_in_c_is_abandoned() -> None:
    """Rung 2 cannot land inside a blocking C call: the thread is given up on at rung 3
    (and ends once released)."""
    release = threading.Event()
    threads: list[threading.Thread] = []
    entered = threading.Event()

    def blocked() -> None:
        threads.append(threading.current_thread())
        entered.set()
        release.wait()

    ex = tb.Executor(policy=FAST)
    try:
        future = ex.submit(blocked)
        await anyio.to_thread.run_sync(entered.wait)
        await until_blocked_in_wait(threads[0])
        assert future.cancel()
        assert await anyio.to_thread.run_sync(future.wait_stopped, 30)
        assert future.stage is tb.Stage.ABANDONED
    finally:
        release.set()
        ex.shutdown()


def test_a_pending_call_cancelled_never_runs(backend: str, tmp_path: Path) -> None:
    first_log, second_log = tmp_path / "first", tmp_path / "second"
    with tb.Executor(backend, max_workers=1, policy=FAST) as ex:
        first = ex.submit(targets.cooperative, str(first_log))
        lines_soon(first_log, 1)
        second = ex.submit(targets.mark, str(second_log), "ran")
        assert not second.running()
        assert second.cancel()
        assert second.cancelled()
        assert second.wait_stopped(30)
        assert second.stage is tb.Stage.COOPERATIVE  # stopped before it started
        assert first.cancel()
        assert first.wait_stopped(30)
    assert not second_log.exists()


def test_max_workers_bounds_the_running_calls(backend: str, tmp_path: Path) -> None:
    logs = [tmp_path / str(i) for i in range(3)]
    # A long grace: a loaded machine once took longer than FAST's 0.05 s to let a
    # cooperative target see its token (rung 2 came, INTERRUPTED where COOPERATIVE was due).
    with tb.Executor(backend, max_workers=2, policy=tb.Policy(grace=30)) as ex:
        futures = [ex.submit(targets.cooperative, str(log)) for log in logs]
        lines_soon(logs[0], 1)
        lines_soon(logs[1], 1)
        assert [f.running() for f in futures] == [True, True, False]
        assert not logs[2].exists()
        futures[0].cancel()
        lines_soon(logs[2], 1)  # its place went to the third
        for future in futures:
            future.cancel()
            assert future.wait_stopped(30)
        assert [f.stage for f in futures] == [tb.Stage.COOPERATIVE] * 3


def test_cancels_and_listings_racing_the_ends_of_calls_settle_each_call_once() -> None:
    """A thread call starts without the ladder's run, made when it is first needed: by
    a cancel, or by running(), which may come as the call ends by itself. Each future
    ends once, with its result or cancelled, and stops; the executor is left empty."""
    listing = threading.Event()
    seen: list[int] = []

    def list_running() -> None:
        while not listing.is_set():
            seen.append(len(tb.running()))  # makes the runs of the calls it lists

    lister = threading.Thread(target=list_running)
    lister.start()
    try:
        with tb.Executor(max_workers=4) as ex:
            for _ in range(300):
                futures = [ex.submit(targets.add, i, i) for i in range(4)]
                for future in futures[::2]:
                    future.cancel()
                for i, future in enumerate(futures):
                    assert future.wait_stopped(30)
                    assert future.done()
                    if future.cancelled():
                        assert future.stage in (tb.Stage.FINISHED, tb.Stage.COOPERATIVE)
                    else:
                        assert (future.result(), future.stage) == (2 * i, tb.Stage.FINISHED)
        assert not ex._core.live  # shut down: every call settled and forgotten
    finally:
        listing.set()
        lister.join(30)
    assert seen  # the listings ran alongside


def test_shutdown_with_cancel_futures_stops_running_calls(backend: str, tmp_path: Path) -> None:
    log, never = tmp_path / "log", tmp_path / "never"
    ex = tb.Executor(backend, max_workers=1, policy=INTERRUPT)
    running = ex.submit(targets.spin_marked, str(log))
    lines_soon(log, 1)
    pending = ex.submit(targets.mark, str(never), "ran")
    ex.shutdown(wait=True, cancel_futures=True)
    # wait=True: both have stopped by now
    assert (running.cancelled(), running.stage) == (True, tb.Stage.INTERRUPTED)
    assert (pending.cancelled(), pending.stage) == (True, tb.Stage.COOPERATIVE)
    assert not never.exists()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(targets.add, 1, 1)


def test_shutdown_waits_for_running_calls(backend: str, tmp_path: Path) -> None:
    ex = tb.Executor(backend)
    future = ex.submit(targets.sleep_marked, str(tmp_path / "log"), 0.2)
    ex.shutdown(wait=True)
    assert future.done()
    assert future.result() == "slept"


def test_shutdown_waits_for_calls_that_end_as_it_begins() -> None:
    """shutdown(wait=True) returns only once every future is done, also when calls end
    (and are forgotten, without the engine's lock under the GIL) while it shuts down."""
    rng = random.Random(20261207)
    for _ in range(300):
        ex = tb.Executor(max_workers=4)
        sizes = [rng.randrange(0, 3000) for _ in range(6)]
        futures = [ex.submit(sum, range(n)) for n in sizes]
        ex.shutdown(wait=True)
        assert all(future.done() for future in futures)
        assert [future.result() for future in futures] == [n * (n - 1) // 2 for n in sizes]


def test_shutdown_without_waiting_lets_go_once_calls_end(backend: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    ex = tb.Executor(backend, policy=INTERRUPT)
    future = ex.submit(targets.spin_marked, str(log))
    lines_soon(log, 1)
    ex.shutdown(wait=False, cancel_futures=True)
    assert future.cancelled()
    assert future.wait_stopped(30)
    assert future.stage is tb.Stage.INTERRUPTED


def test_wait_and_as_completed_see_a_cancelled_running_future_at_once(
    backend: str, tmp_path: Path
) -> None:
    """The stdlib's helpers hear of a cancel at once, while the target still runs."""
    log = tmp_path / "log"
    with tb.Executor(backend, policy=SLOW) as ex:
        future = ex.submit(targets.busy_until_file, str(log))
        lines_soon(log, 1)
        seen: list[Any] = []
        waiter = threading.Thread(target=lambda: seen.append(cf.wait([future], timeout=60)))
        waiter.start()
        future.cancel()
        waiter.join(30)
        done, not_done = seen[0]
        assert (done, not_done) == ({future}, set())
        assert next(cf.as_completed([future], timeout=30)) is future
        # It ignores its token, for now.
        assert (future.stage, future.wait_stopped(0.01)) == (tb.Stage.RUNNING, False)
        Path(str(log) + ".go").touch()
        assert future.wait_stopped(30)
        assert future.stage is tb.Stage.COOPERATIVE


def test_map_timeout_stops_the_calls_not_taken(backend: str, tmp_path: Path) -> None:
    logs = [tmp_path / str(i) for i in range(3)]
    with tb.Executor(backend, max_workers=2, policy=INTERRUPT) as ex:
        futures: list[tb.Future[None]] = []
        real_submit = ex.submit

        def submit(*args: object) -> tb.Future[None]:
            futures.append(real_submit(*args))  # type: ignore[arg-type]
            return futures[-1]

        ex.submit = submit  # type: ignore[method-assign, assignment]
        results = ex.map(targets.spin_marked, [str(log) for log in logs], timeout=0.2)
        lines_soon(logs[0], 1)  # both run (the deadline may be long past by then)
        lines_soon(logs[1], 1)
        with pytest.raises(cf.TimeoutError):
            next(results)
        for future in futures:
            assert future.cancelled()
            assert future.wait_stopped(30)
        stages = [f.stage for f in futures]
        assert stages[:2] == [tb.Stage.INTERRUPTED] * 2  # running: the ladder stopped them
        assert stages[2] is tb.Stage.COOPERATIVE  # waiting for a place: never ran
        assert not logs[2].exists()


def test_a_worker_crash_leaves_the_executor_working() -> None:
    with tb.Executor("process") as ex:
        with pytest.raises(tb.WorkerCrashed):
            ex.submit(targets.kill_own_worker).result(30)
        assert ex.submit(targets.add, 3, 4).result(30) == 7


def test_what_cannot_be_pickled_fails_at_submit_and_nothing_is_lost() -> None:
    lock = threading.Lock()
    with tb.Executor("process") as ex:
        with pytest.raises(TypeError, match="cannot be pickled"):
            ex.submit(targets.add, lock, 1)
        assert ex.submit(targets.add, 1, 1).result(30) == 2


def test_bad_input_is_a_clear_error_at_the_call() -> None:
    async def coroutine_function() -> None:
        pass

    with pytest.raises(TypeError, match="max_workers=4"):
        tb.Executor(4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        tb.Executor(max_workers=0)
    with pytest.raises(TypeError, match=r"policy must be a threadbridge\.Policy"):
        tb.Executor(policy=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        tb.Executor("nope")
    with tb.Executor() as ex:
        with pytest.raises(TypeError, match="async function"):
            ex.submit(coroutine_function)
        with pytest.raises(TypeError, match="expected a callable"):
            ex.submit(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="buffersize"):
            ex.map(targets.add, [1], [2], buffersize=0)
        assert ex.submit(targets.add, 1, 2).result(30) == 3


def test_each_thread_call_has_a_fresh_context() -> None:
    """Each call starts in an empty context, the caller's variables unseen, whatever
    the calls before it on the same pool thread left set (pool threads run such calls
    in a context of their own, made again when a target leaves a variable set)."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller")

    def set_and_read() -> tuple[int, str]:
        seen = var.get()
        var.set("target")
        return threading.get_ident(), seen

    # One after another, each takes an idle pool thread if there is one (a new one
    # only if none is): with more calls than threads, some thread runs several.
    calls = tb.stats().threads + 2
    with tb.Executor(max_workers=1) as ex:
        seen = [ex.submit(set_and_read).result(30) for _ in range(calls)]
    assert {value for _, value in seen} == {"unset"}
    assert len({thread for thread, _ in seen}) < calls


def test_a_dropped_executor_lets_its_loop_and_workers_go() -> None:
    ex = tb.Executor("process")
    assert ex.submit(targets.add, 1, 1).result(30) == 2
    (thread,) = [t for t in threading.enumerate() if t.name == "threadbridge-executor process"]
    del ex
    gc.collect()
    thread.join(30)
    assert not thread.is_alive()


def test_a_process_pool_is_entered_and_left_by_its_executor() -> None:
    pool = tb.ProcessPool(1)
    with tb.Executor(pool) as ex:
        assert ex.submit(targets.pid).result(30) == ex.submit(targets.pid).result(30)
    assert "closed" in repr(pool)


@pytest.mark.anyio
async def test_a_pool_entered_elsewhere_is_refused() -> None:
    async with tb.ProcessPool(1) as pool:
        with pytest.raises(RuntimeError, match="entered once"):
            await anyio.to_thread.run_sync(tb.Executor, pool)


def test_reprs_say_what_they_are() -> None:
    ex = tb.Executor(max_workers=3)
    future = ex.submit(targets.add, 1, 1)
    future.result(30)
    assert re.fullmatch(
        r"<Future at 0x[0-9a-f]+ state=finished returned int add stage=finished>", repr(future)
    )
    assert repr(ex) == "<threadbridge.Executor backend='thread' max_workers=3 open>"
    ex.shutdown()
    assert repr(ex).endswith("shut down>")


def test_a_future_made_by_hand_behaves_as_a_stdlib_one() -> None:
    future: tb.Future[int] = tb.Future()
    running = future.stage
    assert future.cancel()
    assert (running, future.stage) == (tb.Stage.RUNNING, tb.Stage.COOPERATIVE)
    assert future.wait_stopped(0) is False  # cancelled, never notified by an executor
    done: tb.Future[int] = tb.Future()
    done.set_result(1)
    assert (done.stage, done.wait_stopped(0)) == (tb.Stage.FINISHED, True)


@pytest.mark.asyncio
async def test_the_default_executor_stops_to_thread_work_on_cancel() -> None:
    """loop.set_default_executor(Executor()): cancelling a task that awaits
    asyncio.to_thread() or run_in_executor(None, ...) stops the work."""
    loop = asyncio.get_running_loop()
    ex = tb.Executor(policy=INTERRUPT)
    loop.set_default_executor(ex)
    before = tb.stats().stages[tb.Stage.INTERRUPTED]
    started = threading.Event()

    def work() -> None:
        started.set()
        spin_forever()

    for start in (
        lambda: asyncio.to_thread(work),
        lambda: loop.run_in_executor(None, work),
    ):
        started.clear()
        task = asyncio.ensure_future(start())
        await loop.run_in_executor(None, started.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await loop.run_in_executor(None, time.sleep, 0)  # it goes on serving
    await loop.shutdown_default_executor()  # (asyncio.run() ends so) once both stopped
    assert tb.stats().stages[tb.Stage.INTERRUPTED] - before == 2


@pytest.mark.anyio
async def test_a_wait_for_the_stop_begun_before_the_cancel_waits_for_the_ladder() -> None:
    """wait_stopped() called on a running call before it is cancelled (a call that
    started without its run) returns once the ladder has stopped the call, not as soon
    as the future is cancelled (it returned with the stage still RUNNING)."""
    with tb.Executor(policy=INTERRUPT) as ex:
        started = threading.Event()

        def work() -> None:
            started.set()
            spin_forever()

        future = ex.submit(work)
        await anyio.to_thread.run_sync(started.wait)
        seen: list[tuple[bool, tb.Stage]] = []
        waiter = threading.Thread(
            target=lambda: seen.append((future.wait_stopped(30), future.stage))
        )
        waiter.start()
        await until_blocked_in_wait(waiter)
        assert future.cancel()
        await anyio.to_thread.run_sync(waiter.join, 30)
        assert seen == [(True, tb.Stage.INTERRUPTED)]


@pytest.mark.asyncio
async def test_wrap_future_takes_an_executor_future_both_ways() -> None:
    """asyncio.wrap_future(): the result comes through, and cancelling the asyncio side
    cancels the call (which then stops)."""
    with tb.Executor(policy=INTERRUPT) as ex:
        assert await asyncio.wrap_future(ex.submit(targets.add, 2, 3)) == 5
        started = threading.Event()

        def work() -> None:
            started.set()
            spin_forever()

        future = ex.submit(work)
        wrapped = asyncio.wrap_future(future)
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        wrapped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wrapped
        # The call is cancelled from the loop, by a callback of the wrapper's cancel.
        assert await asyncio.to_thread(future.wait_stopped, 30)
        assert (future.cancelled(), future.stage) == (True, tb.Stage.INTERRUPTED)


def test_a_call_cancelled_on_its_way_to_its_loop_never_starts(tmp_path: Path) -> None:
    """A process call cancelled before the executor's loop has taken it up never starts,
    although the rungs after the first come (with no grace) before the loop has it."""
    log = tmp_path / "log"
    at_once = tb.Policy(grace=0, interrupt_grace=0)
    with tb.Executor("process", policy=at_once) as ex:
        ex.submit(int).result(30)  # the loop and a worker are up
        with executor_loop_held(ex):
            future = ex.submit(targets.spin_marked, str(log))
            assert future.cancel()
        assert future.wait_stopped(30)
        assert future.stage is tb.Stage.COOPERATIVE
    assert not log.exists()


def test_from_thread_in_an_executor_target_says_there_is_no_loop() -> None:
    with tb.Executor() as ex:
        future = ex.submit(tb.from_thread.run_sync, int)
        with pytest.raises(RuntimeError, match="an Executor's or call\\(\\)'s target has no event"):
            future.result(30)


def test_calls_that_end_by_themselves_count_as_finished() -> None:
    """A thread call that never needed its run is counted FINISHED (by its pool) before
    its future is done, and its thread is idle again by then."""
    before = tb.stats().stages[tb.Stage.FINISHED]
    with tb.Executor(max_workers=2) as ex:
        for i in range(5):
            assert ex.submit(targets.add, i, 1).result(30) == i + 1
            after = tb.stats()
            assert after.stages[tb.Stage.FINISHED] == before + i + 1
            assert after.busy_threads == 0


def test_a_call_that_loses_its_place_as_it_is_admitted_queues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call that saw a free place but found none once the pool's lock was held (another
    thread took it meanwhile) takes the queued path, with its run: it runs, and nothing
    of the first attempt is left in the pool."""
    from threadbridge import _plain

    refused: list[object] = []
    admit = _plain.ThreadCore.admit_plain

    def lose_the_first(self: _plain.ThreadCore, work: Any) -> bool:
        if not refused:
            refused.append(work)
            return False
        return admit(self, work)

    monkeypatch.setattr(_plain.ThreadCore, "admit_plain", lose_the_first)
    with tb.Executor(max_workers=1) as ex:
        future = ex.submit(targets.add, 2, 3)
        assert future.result(30) == 5
        assert refused
        assert future._run is not None  # it went the queued way
        core = ex._core
        assert isinstance(core, _plain.ThreadCore)
        assert core.in_use == 0
        pool = core.pool
        with pool.lock:
            assert all(w is not refused[0] for w in [*pool.pending.values(), *pool.busy.values()])
        assert ex.submit(targets.add, 1, 1).result(30) == 2  # the plain way again


def test_a_threads_work_is_its_whole_target_state() -> None:
    """A ThreadWork sets every field of its TargetState (and Token) itself, without the
    state's __init__: none may be left unset."""
    from threadbridge import _target, _thread, _token

    work = _thread.ThreadWork(_thread.backend().pool, None, int, ())
    slots = [*_token.Token.__slots__, *_target.TargetState.__slots__]
    slots.remove("__dict__")  # for what the class gives defaults (none made here)
    defaults = ["_watchers", "_event", "depth", "interrupted", "deferred", "abandoned"]
    fields = [*slots, *defaults, "resend", "again"]
    unset = [name for name in fields if not hasattr(work, name)]
    assert unset == []
    assert not hasattr(work, "__dict__") or not work.__dict__
    fresh = _target.TargetState(threading.Lock())
    assert {n: getattr(work, n) for n in fields if n not in ("lock", "portal")} == {
        n: getattr(fresh, n) for n in fields if n not in ("lock", "portal")
    }
    assert work.token is work
    assert not work.is_set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_an_executor_goes_on_in_a_forked_child() -> None:
    """An executor made before a fork works in the child: its lock is the thread pool's,
    which the child makes anew, and the condition that shutdown(wait=True) waits on is
    made again for it there (the parent's, on the parent's lock, is made before the fork
    here: a call ending after shutdown notifies it)."""
    from threadbridge import _plain

    ex = tb.Executor(max_workers=2)
    assert ex.submit(targets.add, 1, 1).result(30) == 2
    core = ex._core
    assert isinstance(core, _plain.ThreadCore)
    with core.lock:
        parents = core.idle
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            errors: list[object] = []
            threading.excepthook = errors.append  # a pool thread's error would end here
            gate = threading.Event()
            futures = [ex.submit(targets.add, i, i) for i in range(3)]
            futures.append(ex.submit(gate.wait, 30))
            ex.shutdown(wait=False)  # shut while a call still runs: its end notifies
            gate.set()
            ex.shutdown(wait=True)
            results = [f.result(0) for f in futures]
            if results == [0, 2, 4, True] and not errors and core.idle is not parents:
                code = 0
        finally:
            os._exit(code)
    assert forked_child_exit_code(pid, "an executor") == 0
    assert ex.submit(targets.add, 2, 2).result(30) == 4  # the parent's goes on too
    ex.shutdown(wait=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_calls_the_parent_runs_at_a_fork_are_settled_in_the_child() -> None:
    """A call running (or queued) at the fork runs in the parent only: in the child its
    future is settled at once with an error that says so, its place is free, and
    shutdown(wait=True) does not wait for it. (It used to: a call that had just settled
    its future was still counted live, and the child's shutdown waited for ever.)"""
    ex = tb.Executor(max_workers=1)
    started, gate = threading.Event(), threading.Event()

    def hold() -> str:
        started.set()
        gate.wait(30)
        return "parent"

    running = ex.submit(hold)
    queued = ex.submit(targets.add, 1, 1)
    assert started.wait(30)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            messages = []
            for future in (running, queued):
                try:
                    future.result(0)
                except RuntimeError as exc:
                    messages.append(str(exc))
            fresh = ex.submit(targets.add, 2, 2).result(30)  # the one place is free
            ex.shutdown(wait=True)
            if (
                len(messages) == 2
                and all("submitted before the process forked" in m for m in messages)
                and fresh == 4
                and running.done()
                and running.wait_stopped(0)
            ):
                code = 0
        finally:
            os._exit(code)
    assert forked_child_exit_code(pid, "an executor's calls at the fork") == 0
    gate.set()
    assert running.result(30) == "parent"
    assert queued.result(30) == 2
    ex.shutdown(wait=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_process_executor_refuses_in_a_forked_child() -> None:
    """A process executor's loop and workers are the parent's: in a forked child a
    submit is refused at once with the reason (it used to be posted to a loop that no
    thread runs there, and hang), and shutdown(wait=True) returns; call() makes engines
    of its own in the child."""
    from threadbridge import _call

    ex = tb.Executor(backend="process", max_workers=1)
    assert ex.submit(targets.add, 1, 1).result(30) == 2
    # call()'s process engine, made here: its loop and workers are the parent's too.
    assert tb.call(targets.add, 1, 2, backend="process", timeout=30) == 3
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            try:
                ex.submit(targets.add, 2, 2)
            except RuntimeError as exc:
                refused = "made before the process forked" in str(exc)
            else:
                refused = False
            ex.shutdown(wait=True)
            answered = tb.call(targets.add, 3, 3, backend="process", timeout=30)
            _call.close_engines()  # the child's own worker ends with it
            if refused and answered == 6:
                code = 0
        finally:
            os._exit(code)
    assert forked_child_exit_code(pid, "a process executor") == 0
    assert ex.submit(targets.add, 3, 3).result(30) == 6  # the parent's goes on
    ex.shutdown(wait=True)


def test_a_call_with_a_free_place_starts_without_its_run() -> None:
    """Unless it is traced, a thread call with a place free starts without the ladder's
    run (whether opentelemetry is imported or not: other tests may have imported it);
    its cancel makes the run, and the ladder stops it."""
    from opentelemetry import trace  # imported, no provider set here

    assert trace.get_tracer_provider() is not None
    with tb.Executor(policy=SLOW) as ex:
        done = ex.submit(targets.add, 1, 1)
        assert done.result(30) == 2
        assert (done._run, done.stage) == (None, tb.Stage.FINISHED)
        waiting = ex.submit(tb.sleep, 60)  # wakes at rung 1
        runs = [waiting._run]
        assert waiting._work is not None
        assert waiting.cancel()
        runs.append(waiting._run)
        assert runs[0] is None
        assert runs[1] is not None
        assert waiting.wait_stopped(30)
        assert waiting.stage is tb.Stage.COOPERATIVE


def test_an_executor_dropped_while_the_pool_lock_is_held_lets_go_of_it() -> None:
    """An executor dropped without shutdown() is shut by a finalizer, which may run
    anywhere: in a garbage collection, or as the last reference goes, in the middle of a
    thread's locked step on the thread pool (whose lock the executor's engine shares). It
    must not take that lock there (it did, and the thread deadlocked on itself)."""
    from threadbridge import _thread

    held = [tb.Executor()]
    assert held[0].submit(targets.add, 1, 1).result(30) == 2
    core = held[0]._core
    pool = _thread.backend().pool
    done = threading.Event()

    def drop_it_holding_the_lock() -> None:
        with pool.lock:
            held.clear()  # the finalizer runs here, the lock held
            done.set()

    dropper = threading.Thread(target=drop_it_holding_the_lock, daemon=True)
    dropper.start()
    assert done.wait(30), "the finalizer waited for the lock its own thread held"
    dropper.join(30)
    assert core.shut
    with tb.Executor() as ex:  # the pool goes on
        assert ex.submit(targets.add, 2, 2).result(30) == 4
