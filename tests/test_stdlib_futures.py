"""The stdlib's contract for executors and futures, checked against threadbridge.Executor
and threadbridge.Future: what CPython's own suite (Lib/test/test_concurrent_futures, 3.14)
asks of ThreadPoolExecutor and ProcessPoolExecutor, written again here for pytest, on
threads and on worker processes.

Covered: future states and callbacks (test_future), submit / map / references
(executor), wait() (test_wait), as_completed() (test_as_completed), shutdown and the exit
of the interpreter (test_shutdown), the thread pool's own cases (test_thread_pool).

Not applicable, and why:

* Tests that read the stdlib executors' internals (``_threads``, ``_processes``,
  ``_executor_manager_thread``, ``_call_queue``, thread names, ``test_saturation``,
  ``test_idle_thread_reuse``, ``test_threads_terminate``): threadbridge runs calls on its
  process-wide pool of threads and its own worker processes; ``stats()`` counts them.
* ``mp_context``, ``max_tasks_per_child``, the fork-in-thread and global-shutdown-lock
  cases, ``test_deadlock``, ``test_init``, ``test_process_pool``: those are about
  multiprocessing's machinery. threadbridge's start methods (``set_start_method``), its
  ``ProcessPool(initializer=, max_tasks_per_worker=)`` and its worker crashes (a crash or
  an unpicklable object never breaks the pool) have their own tests.
* ``InterpreterPoolExecutor`` tests; ``Future._get_snapshot`` (a private helper of 3.14);
  ``test_class_str`` (the stdlib's own class names).
* ``test_cancel_futures`` differs by design: ``shutdown(cancel_futures=True)`` stops
  running calls too, so no call is left to finish (checked as such below).
* ``test_default_workers``: threads default to ``min(32, CPUs + 4)`` as the stdlib does,
  where the CPUs are those this process may use (affinity and cgroup quota), which can be
  fewer than ``os.process_cpu_count()``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gc
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import threadbridge as tb
from threadbridge._cpus import usable_cpus

from . import targets

WORKERS = 5


@pytest.fixture(params=["thread", "process"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def executor(backend: str) -> Any:
    ex = tb.Executor(backend, max_workers=WORKERS)
    yield ex
    ex.shutdown(wait=True)


class Gate:
    """A gate a target waits at, in a thread or a worker process (a file appears)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> None:
        Path(str(self.path) + ".go").touch()


def gate(tmp_path: Path, name: str = "gate") -> tuple[Gate, str]:
    path = tmp_path / name
    return Gate(path), str(path)


def sleep_and_print(seconds: float, message: str) -> None:
    time.sleep(seconds)
    print(message, flush=True)


# --- futures made by hand, in each state -------------------------------------------------


def pending() -> tb.Future[Any]:
    return tb.Future()


def running() -> tb.Future[Any]:
    future: tb.Future[Any] = tb.Future()
    assert future.set_running_or_notify_cancel()
    return future


def cancelled() -> tb.Future[Any]:
    future: tb.Future[Any] = tb.Future()
    assert future.cancel()
    return future


def cancelled_and_notified() -> tb.Future[Any]:
    future = cancelled()
    assert not future.set_running_or_notify_cancel()
    return future


def failed() -> tb.Future[Any]:
    future: tb.Future[Any] = tb.Future()
    future.set_exception(OSError())
    return future


def succeeded() -> tb.Future[Any]:
    future: tb.Future[Any] = tb.Future()
    future.set_result(42)
    return future


# --- Future --------------------------------------------------------------------------


def test_done_callbacks_see_result_exception_and_cancel() -> None:
    seen: list[object] = []
    finishers: list[Callable[[cf.Future[Any]], object]] = [
        lambda f: f.set_result(5),
        lambda f: f.set_exception(Exception("test")),
        lambda f: f.cancel(),
    ]
    for finish in finishers:
        before: tb.Future[Any] = tb.Future()  # a callback added before it is done
        after: tb.Future[Any] = tb.Future()  # and one added after
        before.add_done_callback(lambda f: seen.append(_outcome(f)))
        finish(before)
        finish(after)
        after.add_done_callback(lambda f: seen.append(_outcome(f)))
    assert seen == [5, 5, ("test",), ("test",), "cancelled", "cancelled"]


def _outcome(future: cf.Future[Any]) -> object:
    if future.cancelled():
        return "cancelled"
    exc = future.exception()
    return exc.args if exc is not None else future.result()


def test_a_raising_callback_is_logged_and_the_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def raising(_: object) -> None:
        ran.append("raising")
        raise Exception("doh!")  # noqa: TRY002 - any exception, as the stdlib's test

    future: tb.Future[int] = tb.Future()
    future.add_done_callback(raising)
    future.add_done_callback(lambda _: ran.append("next"))
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        future.set_result(5)
        future.add_done_callback(raising)  # already done: called at once
    assert ran == ["raising", "next", "raising"]
    assert caplog.text.count("exception calling callback for") == 2
    assert "doh!" in caplog.text


def test_repr_of_each_state() -> None:
    cases = [
        (pending(), "pending"),
        (running(), "running"),
        (cancelled(), "cancelled"),
        (cancelled_and_notified(), "cancelled"),
        (failed(), "finished raised OSError"),
        (succeeded(), "finished returned int"),
    ]
    for future, state in cases:
        assert repr(future).startswith("<Future at 0x")
        assert repr(future).endswith(f" state={state}>")


def test_cancel_cancelled_done_running_by_state() -> None:
    # (cancel() returns, cancelled(), done(), running()) after the cancel
    expected = {
        pending: (True, True, True, False),
        running: (False, False, False, True),  # made by hand: no ladder to climb
        cancelled: (True, True, True, False),
        cancelled_and_notified: (True, True, True, False),
        failed: (False, False, True, False),
        succeeded: (False, False, True, False),
    }
    for make, outcome in expected.items():
        future = make()
        assert (future.cancel(), future.cancelled(), future.done(), future.running()) == outcome


def test_result_and_exception_with_a_zero_timeout() -> None:
    for make in (pending, running):
        with pytest.raises(cf.TimeoutError):
            make().result(timeout=0)
        with pytest.raises(cf.TimeoutError):
            make().exception(timeout=0)
    for make in (cancelled, cancelled_and_notified):
        with pytest.raises(cf.CancelledError):
            make().result(timeout=0)
        with pytest.raises(cf.CancelledError):
            make().exception(timeout=0)
    with pytest.raises(OSError):
        failed().result(timeout=0)
    assert isinstance(failed().exception(timeout=0), OSError)
    assert succeeded().result(timeout=0) == 42
    assert succeeded().exception(timeout=0) is None


def test_a_waiting_result_wakes_for_a_result_or_a_cancel() -> None:
    for finish, check in (
        (lambda f: f.set_result(42), lambda f: f.result(timeout=30) == 42),
        (lambda f: f.cancel(), lambda f: _raises(cf.CancelledError, f.result, 30)),
        (lambda f: f.set_exception(OSError()), lambda f: isinstance(f.exception(30), OSError)),
    ):
        future: tb.Future[int] = tb.Future()
        thread = threading.Thread(target=finish, args=(future,))
        thread.start()
        assert check(future)
        thread.join()


def _raises(kind: type[BaseException], fn: Any, *args: object) -> bool:
    try:
        fn(*args)
    except kind:
        return True
    return False


def test_a_second_result_or_exception_is_refused() -> None:
    future: tb.Future[int] = tb.Future()
    future.set_result(1)
    with pytest.raises(cf.InvalidStateError, match="state=finished returned int"):
        future.set_result(2)
    assert future.result() == 1
    other: tb.Future[int] = tb.Future()
    error = ValueError()
    other.set_exception(error)
    with pytest.raises(cf.InvalidStateError, match="state=finished raised ValueError"):
        other.set_exception(Exception())
    assert other.exception() is error


# --- Executor: submit, map, references ---------------------------------------------------


def test_submit_with_arguments_and_keywords(executor: tb.Executor) -> None:
    assert executor.submit(pow, 2, 8).result(30) == 256
    assert executor.submit(targets.add, 2, b=8).result(30) == 10
    # `self` and `fn` are keywords like any other for the target
    assert executor.submit(targets.capture, 1, self=2, fn=3).result(30) == (
        (1,),
        {"self": 2, "fn": 3},
    )
    with pytest.raises(TypeError):
        executor.submit(fn=targets.capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        executor.submit(arg=1)  # type: ignore[call-arg]


def test_map_in_order_with_any_chunksize(executor: tb.Executor) -> None:
    expected = list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10))) == expected
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == expected


def test_map_raises_at_the_failing_item(executor: tb.Executor) -> None:
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout(executor: tb.Executor, tmp_path: Path) -> None:
    gates = [gate(tmp_path, str(i)) for i in range(3)]
    gates[0][0].open()
    gates[1][0].open()
    results: list[object] = []
    executor.submit(int).result(30)  # warm: the open gates' calls end well within the timeout
    values = executor.map(targets.busy_until_file, [p for _, p in gates], timeout=3)
    with pytest.raises(cf.TimeoutError):  # noqa: PT012 - the loop is what times out
        for value in values:
            results.append(value)
    gates[2][0].open()
    assert results == [None, None]


def test_map_with_a_zero_timeout_cancels_the_current_call_too() -> None:
    """The call whose result timed out is cancelled with those after it: neither runs."""
    log: list[str] = []
    stop = threading.Event()

    def log_and_wait(name: str) -> None:
        log.append(f"{name} started")
        try:
            stop.wait()
        finally:
            log.append(f"{name} stopped")

    with tb.Executor(max_workers=1) as pool:
        first = pool.submit(log_and_wait, "first")
        try:
            results = pool.map(log_and_wait, ["second", "third"], timeout=0)
            with contextlib.closing(results) as it, pytest.raises(cf.TimeoutError):
                next(it)
        finally:
            stop.set()
        first.result(30)
    assert log == ["first started", "first stopped"]


def test_map_submits_without_being_iterated() -> None:
    finished: list[int] = []
    executor = tb.Executor(max_workers=WORKERS)
    executor.map(finished.append, range(10))
    executor.shutdown(wait=True)
    assert sorted(finished) == list(range(10))


def test_shutdown_right_after_map(executor: tb.Executor) -> None:
    executor.map(str, [2] * (WORKERS + 1))
    executor.shutdown()


def _collect_if_free_threaded() -> None:
    """Where there is no GIL, an object made in another thread is freed only once that
    thread's share of its reference count is merged, which a collection does (CPython's
    own test collects there too). With the GIL, nothing is collected: the check is that
    no reference cycle or stray reference keeps it."""
    if getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        gc.collect()


def test_no_stale_references_to_a_discarded_call() -> None:
    thing = targets.Thing()
    # The weakref's callback runs wherever the object is freed, possibly inside a
    # lock's code in this thread (a collection, or on a free-threaded build a merge of
    # reference counts): it writes to a pipe, which takes no lock, rather than set an
    # Event whose lock this thread may hold at that moment.
    read_end, write_end = os.pipe()
    ref = weakref.ref(thing, lambda _: os.write(write_end, b"x"))
    try:
        with tb.Executor(max_workers=WORKERS) as executor:
            executor.submit(thing.method)  # its future is dropped
            del thing
            deadline = time.monotonic() + 30
            while not select.select([read_end], [], [], 0.1)[0]:
                _collect_if_free_threaded()
                assert time.monotonic() < deadline, "the executor kept the call alive"
        assert ref() is None
    finally:
        os.close(read_end)
        os.close(write_end)


def test_map_keeps_no_reference_to_the_results_it_gave(executor: tb.Executor) -> None:
    for obj in executor.map(targets.make_thing, range(10)):
        ref = weakref.ref(obj)
        del obj
        _collect_if_free_threaded()
        assert ref() is None


@pytest.mark.parametrize("number", [0, -1])
def test_max_workers_must_be_greater_than_zero(number: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        tb.Executor(max_workers=number)


def test_default_workers_for_threads() -> None:
    with tb.Executor() as executor:
        assert executor._max_workers == min(32, usable_cpus() + 4)


# --- wait() --------------------------------------------------------------------------


def test_wait_on_a_future_given_twice(executor: tb.Executor) -> None:
    future = executor.submit(targets.add, 1, 2)
    done, not_done = cf.wait([future, future], return_when=cf.ALL_COMPLETED)
    assert (done, not_done) == ({future}, set())


def test_wait_first_completed(executor: tb.Executor, tmp_path: Path) -> None:
    door, path = gate(tmp_path)
    never = cancelled()
    quick = executor.submit(targets.add, 21, 21)
    slow = executor.submit(targets.busy_until_file, path)
    try:
        done, not_done = cf.wait([never, quick, slow], return_when=cf.FIRST_COMPLETED)
        assert (done, not_done) == ({quick}, {never, slow})
    finally:
        door.open()
    slow.result(30)


def test_wait_first_completed_some_already_done(executor: tb.Executor, tmp_path: Path) -> None:
    door, path = gate(tmp_path)
    notified, ok = cancelled_and_notified(), succeeded()
    slow = executor.submit(targets.busy_until_file, path)
    try:
        done, not_done = cf.wait([notified, ok, slow], return_when=cf.FIRST_COMPLETED)
        assert (done, not_done) == ({notified, ok}, {slow})
    finally:
        door.open()
    slow.result(30)


def test_wait_first_exception(executor: tb.Executor, tmp_path: Path) -> None:
    raise_door, raise_path = gate(tmp_path, "raise")
    door, path = gate(tmp_path)
    quick = executor.submit(targets.add, 2, 21)
    raising = executor.submit(targets.raise_after_file, raise_path)
    slow = executor.submit(targets.busy_until_file, path)
    quick.add_done_callback(lambda _: raise_door.open())  # it raises once quick is done
    try:
        calls: list[cf.Future[Any]] = [quick, raising, slow]
        done, not_done = cf.wait(calls, return_when=cf.FIRST_EXCEPTION)
        assert (done, not_done) == ({quick, raising}, {slow})
    finally:
        raise_door.open()
        door.open()
    slow.result(30)


def test_wait_first_exception_some_already_done(executor: tb.Executor, tmp_path: Path) -> None:
    door, path = gate(tmp_path)
    ok, never, notified = succeeded(), cancelled(), cancelled_and_notified()
    error = executor.submit(divmod, 21, 0)
    slow = executor.submit(targets.busy_until_file, path)
    try:
        done, not_done = cf.wait([ok, never, notified, error, slow], return_when=cf.FIRST_EXCEPTION)
        # A future cancelled by hand but never notified is not done for wait().
        assert (done, not_done) == ({ok, notified, error}, {never, slow})
    finally:
        door.open()
    slow.result(30)


def test_wait_first_exception_one_already_failed(executor: tb.Executor, tmp_path: Path) -> None:
    door, path = gate(tmp_path)
    raised = failed()
    slow = executor.submit(targets.busy_until_file, path)
    try:
        done, not_done = cf.wait([raised, slow], return_when=cf.FIRST_EXCEPTION)
        assert (done, not_done) == ({raised}, {slow})
    finally:
        door.open()
    slow.result(30)


def test_wait_all_completed(executor: tb.Executor) -> None:
    fixed = [succeeded(), cancelled_and_notified(), failed()]
    calls = [executor.submit(divmod, 2, 0), executor.submit(targets.add, 2, 21)]
    done, not_done = cf.wait(fixed + calls, return_when=cf.ALL_COMPLETED)
    assert (done, not_done) == (set(fixed + calls), set())


def test_wait_times_out(executor: tb.Executor, tmp_path: Path) -> None:
    door, path = gate(tmp_path)
    fixed = {cancelled_and_notified(), failed(), succeeded()}
    slow = executor.submit(targets.busy_until_file, path)
    try:
        done, not_done = cf.wait(fixed | {slow}, timeout=0.05, return_when=cf.ALL_COMPLETED)
        assert (done, not_done) == (fixed, {slow})
    finally:
        door.open()
    slow.result(30)


def test_wait_for_many_calls_racing_to_finish() -> None:
    go = threading.Event()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with tb.Executor(max_workers=WORKERS) as executor:
            calls = {executor.submit(go.wait) for _ in range(100)}
            go.set()
            done, not_done = cf.wait(calls, timeout=60, return_when=cf.ALL_COMPLETED)
            assert (len(done), not_done) == (100, set())
    finally:
        sys.setswitchinterval(switch)


# --- as_completed() ------------------------------------------------------------------


def test_as_completed_without_timeout(executor: tb.Executor) -> None:
    fixed = {cancelled_and_notified(), failed(), succeeded()}
    calls = {executor.submit(targets.add, 2, 21), executor.submit(targets.add, 7, 6)}
    assert set(cf.as_completed(fixed | calls)) == fixed | calls


@pytest.mark.parametrize("timeout", [0, 0.1])
def test_as_completed_times_out(executor: tb.Executor, tmp_path: Path, timeout: float) -> None:
    door, path = gate(tmp_path)
    fixed = {cancelled_and_notified(), failed(), succeeded()}
    slow = executor.submit(targets.busy_until_file, path)
    seen: set[object] = set()
    with pytest.raises(cf.TimeoutError):  # noqa: PT012 - the loop is what times out
        for future in cf.as_completed(fixed | {slow}, timeout):
            seen.add(future)
    door.open()
    assert seen == fixed
    slow.result(30)


def test_as_completed_gives_a_future_given_twice_once(executor: tb.Executor) -> None:
    future = executor.submit(targets.add, 1, 1)
    assert len(list(cf.as_completed([future, future, future]))) == 1


def test_as_completed_keeps_no_reference_to_what_it_gave() -> None:
    futures: list[cf.Future[Any]] = [tb.Future() for _ in range(8)]
    futures += [cancelled_and_notified(), succeeded()]
    with pytest.raises(cf.TimeoutError):  # noqa: PT012 - the loop is what times out
        for future in cf.as_completed(futures, timeout=0):
            futures.remove(future)
            ref = weakref.ref(future)
            del future
            assert ref() is None
    futures[0].set_result("test")
    for future in cf.as_completed(futures):
        futures.remove(future)
        ref = weakref.ref(future)
        del future
        assert ref() is None
        if futures:
            futures[0].set_result("test")


def test_as_completed_timeout_message() -> None:
    futures = [cancelled_and_notified(), pending(), running(), succeeded()]
    with pytest.raises(cf.TimeoutError, match=r"^2 \(of 4\) futures unfinished$"):
        list(cf.as_completed(futures, timeout=0))


# --- shutdown, and the end of the program -------------------------------------------------


def test_submit_after_shutdown_is_refused(executor: tb.Executor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 5)


def test_shutdown_waits_for_every_queued_call(backend: str) -> None:
    executor = tb.Executor(backend, max_workers=WORKERS)
    calls = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    executor.shutdown()
    assert all(call.done() for call in calls)
    assert [call.result() for call in calls] == [None] * 50


def test_shutdown_cancelling_futures_stops_running_calls_too(backend: str) -> None:
    """By design (see above): every call is cancelled, running ones by their ladder, and
    by the time shutdown() returns each has stopped."""
    executor = tb.Executor(backend, max_workers=WORKERS)
    calls = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    executor.shutdown(cancel_futures=True)
    assert all(call.done() for call in calls)
    assert all(call.cancelled() or call.exception() is None for call in calls)
    assert sum(call.cancelled() for call in calls) > 40
    assert all(call.wait_stopped(0) for call in calls)


def test_shutdown_after_cancelling_a_fresh_call(backend: str) -> None:
    executor = tb.Executor(backend, max_workers=1)
    executor.submit(int).result(30)
    executor.submit(int).cancel()
    finished = threading.Event()

    def shut() -> None:
        executor.shutdown(wait=True)
        finished.set()

    thread = threading.Thread(target=shut)
    thread.start()
    assert finished.wait(30), "shutdown(wait=True) hung after a cancel"
    thread.join()


def test_context_manager_shuts_down(backend: str) -> None:
    with tb.Executor(backend, max_workers=WORKERS) as executor:
        assert list(executor.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(abs, 1)


def _program(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "program.py"
    script.write_text(
        "import atexit, os, sys, time\nimport threadbridge as tb\n\n"
        "def sleep_and_print(t, msg, mark=None):\n"
        "    if mark:\n        open(mark, 'w').close()\n"
        "    time.sleep(t)\n    print(msg, flush=True)\n\n"
        'if __name__ == "__main__":\n' + body
    )
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


@pytest.mark.parametrize("ending", ["", "    ex.shutdown(wait=False)\n"])
def test_calls_left_running_end_before_the_program_exits(
    tmp_path: Path, backend: str, ending: str
) -> None:
    # The program ends once its call runs. (On Python 3.12 a call that has not started
    # when the program ends cannot start: no thread may start at exit there.)
    done = _program(
        tmp_path,
        f"    ex = tb.Executor({backend!r}, max_workers=5)\n"
        '    ex.submit(sleep_and_print, 0.5, "apple", "started")\n'
        "    while not os.path.exists('started'):\n"
        "        time.sleep(0.001)\n" + ending,
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "apple", "")


def test_a_first_process_call_made_as_the_program_ends_finishes(tmp_path: Path) -> None:
    """The program ends right after its first process call: the worker boots while the
    interpreter exits, when (3.12 and later) no thread may start, the ladder's scheduler
    included. The call still finishes, and the program exits. (The pool's timers raised
    into the reader of the worker's answers, and the program hung.)"""
    done = _program(
        tmp_path,
        "    ex = tb.Executor('process', max_workers=2)\n"
        '    ex.submit(sleep_and_print, 0, "apple")\n',
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "apple", "")


def test_submit_at_exit_is_refused(tmp_path: Path, backend: str) -> None:
    done = _program(
        tmp_path,
        f"    ex = tb.Executor({backend!r}, max_workers=5)\n"
        "    ex.submit(id, 42).result()\n"
        "    @atexit.register\n"
        "    def run_last():\n"
        "        try:\n"
        "            ex.submit(id, None)\n"
        "        except RuntimeError as exc:\n"
        "            print(exc)\n",
    )
    assert done.stdout.strip() == "cannot schedule new futures after interpreter shutdown"


def test_cancel_futures_without_waiting_at_exit(tmp_path: Path) -> None:
    done = _program(
        tmp_path,
        "    ex = tb.Executor()\n"
        '    ex.submit(sleep_and_print, 0.1, "apple")\n'
        "    ex.shutdown(wait=False, cancel_futures=True)\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("apple", "")  # cancelled before or after it printed
    assert "Traceback" not in done.stderr
