"""backend="ray": the ladder on a real local Ray cluster, on both loops.

The session starts a cluster of its own with ``ray start --head``: its processes are not
children of the test run (the leak checks see only what the tests themselves leave), it
listens on ports that are free (a cluster already running on the machine is no
obstacle), and its processes form a session of their own, which is what stops it at the
end: exactly that cluster, never another one of this machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

import threadbridge as tb

from . import ray_watchdog, targets
from .helpers import lines_soon
from .test_process import lines_of
from .tracing import Spans

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
from threadbridge.ray import RayBackend  # noqa: E402 - only once Ray is known to be there

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.usefixtures("ray_cluster"),
    pytest.mark.foreign_sockets,
]

CPUS = 2


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The session's cluster; yields the id of the session its processes are in."""
    cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # `ray start` turns token authentication on by itself when ~/.ray/auth_token exists;
    # a driver given an address (as here) does not, and could not connect. Unless the
    # environment chooses, the cluster goes by the driver's default.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray picks the head's port itself (0); the ports that have fixed defaults are chosen
    # free here; Ray picks the others at random.
    command = [
        cli, "start", "--head", "--port=0", f"--num-cpus={CPUS}",
        "--include-dashboard=false", f"--dashboard-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    # A session of its own: every process of the cluster, and every worker its raylet
    # starts, is in it, and nothing else is. (`ray stop` stops every cluster of the
    # machine.)
    starter = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    # If the run dies without its teardown (pytest-timeout ends a hung run with
    # os._exit), this watchdog, which waits for the end of its stdin, stops the cluster
    # all the same.
    watchdog = subprocess.Popen(
        [sys.executable, str(Path(ray_watchdog.__file__)), str(starter.pid)],
        stdin=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = starter.communicate(timeout=120)
        address_file = temp / "ray_current_cluster"  # where `ray start` writes it
        if starter.returncode != 0 or not address_file.exists():
            pytest.fail(
                f"`ray start --head` failed (exit {starter.returncode}).\n{out[-2000:]}\n"
                f"{err[-3000:]}"
            )
        ray.init(address=address_file.read_text().strip(), log_to_driver=False)
        anyio.run(_warm_up)
        yield starter.pid
    finally:
        if starter.returncode is None:
            starter.kill()
            starter.wait()
        ray.shutdown()
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # the watchdog stops the cluster now
        watchdog.wait(timeout=150)
    left = ray_watchdog.session_members(starter.pid)
    assert not left, f"the cluster's processes outlived its stop: {left}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _warm_up() -> None:
    """Ray's driver opens its connections (to the control actor, to each worker it leases)
    on first use: opened here, they are not counted as the first tests' leaks."""
    async with anyio.create_task_group() as tg:
        for _ in range(CPUS):
            tg.start_soon(lambda: tb.run_killable(time.sleep, 0.5, backend="ray"))


def _running_our_tasks(cluster: int) -> list[int]:
    """The cluster's Ray workers that run a threadbridge task now (Ray names a worker's
    process after the task it runs)."""
    found = []
    for proc in ray_watchdog.session_members(cluster):
        try:
            if " ".join(proc.cmdline()).startswith("ray::_run_remote"):
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


@pytest.fixture(autouse=True)
def no_ray_task_left(ray_cluster: int) -> Iterator[None]:
    """Fail the test if a Ray worker still runs one of its targets a while after it."""
    yield
    deadline = time.monotonic() + 10
    while running := _running_our_tasks(ray_cluster):
        assert time.monotonic() < deadline, f"Ray workers still run: {running}"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def until_gone(pid: int) -> None:
    with anyio.fail_after(30):
        while not gone(pid):
            await anyio.sleep(0.01)


async def test_results_and_exceptions_come_back_as_themselves() -> None:
    assert await tb.run_killable(targets.add, 2, 3, backend="ray") == 5
    assert await tb.run_killable(lambda x: x * 2, 21, backend=RayBackend()) == 42
    with pytest.raises(targets.CustomError, match="remote") as info:
        await tb.run_killable(targets.raise_custom, "remote", backend="ray")
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "raise_custom" in names


async def test_the_trace_context_travels_to_the_task(spans: Spans) -> None:
    seen = await tb.run_killable(targets.current_trace, backend="ray")
    call = spans.named("current_trace")
    assert seen == (call.context.trace_id, call.context.span_id)


async def test_rung1_sets_the_token_the_task_sees(tmp_path: Path) -> None:
    """check_cancelled() and sleep() inside the task end it COOPERATIVE."""
    for target in (targets.cooperative, targets.tb_sleeper):
        path = tmp_path / target.__name__
        handle = tb.spawn(target, str(path), backend="ray", policy=tb.Policy(grace=30))
        await lines_of(path, 1)
        with anyio.fail_after(20):
            assert await handle.stop() is tb.Stage.COOPERATIVE


async def test_rung2_lands_inside_time_sleep_and_runs_finally(tmp_path: Path) -> None:
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    handle = tb.spawn(targets.blocking_sleeper, str(path), backend="ray", policy=policy)
    await lines_of(path, 1)
    with anyio.fail_after(20):
        assert await handle.stop() is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines()[1:] == ["TargetCancelled", "finally"]
    # Where it was as rung 2 fired: taken by the task's watcher, sent with the answer.
    assert handle.stopped_at is not None
    assert handle.stopped_at.splitlines()[0].endswith(", in blocking_sleeper")


async def test_running_lists_a_task_and_its_watcher_says_where(tmp_path: Path) -> None:
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    handle = tb.spawn(targets.spin_marked, str(path), backend="ray", policy=policy)
    await lines_of(path, 1)
    (target,) = tb.running()
    assert (target.name, target.backend, target.rung) == ("spin_marked", "ray", 0)
    # Asked through the control actor of the task's watcher (which starts to listen a
    # moment after the task starts: the first ask may find it not listening yet).
    for _ in range(10):
        said = await anyio.to_thread.run_sync(target.where)
        if said.startswith("  File"):
            break
    assert said.splitlines()[0].endswith(", in spin_marked")
    with anyio.fail_after(20):
        assert await handle.stop() is tb.Stage.INTERRUPTED
    assert tb.running() == []


async def test_rung2_is_sent_again_until_its_handler_has_run(tmp_path: Path) -> None:
    """As in a worker process: rung 2's signal that the task's thread takes before
    threadbridge's handler can run (here the target takes it itself, as CPython does when
    it arrives just before a blocking call) is sent again, and the task ends INTERRUPTED."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt_grace=10)
    handle = tb.spawn(
        targets.takes_first_rung2_signal, str(path), "SIGUSR2", backend="ray", policy=policy
    )
    await lines_of(path, 1)
    assert await handle.stop() is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines() == ["started", "took the signal", "interrupted"]


async def test_rung3_kills_the_worker_and_the_targets_children(tmp_path: Path) -> None:
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt=False, interrupt_grace=0.05)
    handle = tb.spawn(targets.children_then_spin, str(path), backend="ray", policy=policy)
    (line,) = await lines_of(path, 1)
    worker, child = (int(x) for x in line.split())
    with anyio.fail_after(20):
        assert await handle.stop() is tb.Stage.KILLED
    assert gone(worker)  # Ray reported the end once the worker was dead
    await until_gone(child)


async def test_a_task_killed_after_rung2_says_where_rung2_found_it(tmp_path: Path) -> None:
    """A task that swallows rung 2 and goes on is killed at rung 3. It sends no answer,
    which would carry where rung 2 found it: its watcher told the driver's control actor
    at once, and that is its stopped_at by the time the kill is reported."""
    path = tmp_path / "log"
    # Time for rung 2 to land (and be swallowed) before rung 3, on a loaded machine too.
    policy = tb.Policy(grace=0.05, interrupt_grace=3.0)
    handle = tb.spawn(targets.swallows, str(path), backend="ray", policy=policy)
    await lines_of(path, 1)
    with anyio.fail_after(30):
        assert await handle.stop() is tb.Stage.KILLED
    assert await lines_of(path, 2) == ["started", "swallowed"]
    assert handle.stopped_at is not None
    assert handle.stopped_at.splitlines()[0].endswith(", in swallows")


async def test_a_task_killed_without_rung2_says_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no rung 2 to say it (interrupt=False), rung 3 asks the task's watcher where
    its target is before the kill: the kill's record says it, and stopped_at keeps it."""
    from threadbridge.ray import _work

    # The kill follows the answer; by default it waits for it 0.5 s, which a loaded
    # machine may take.
    monkeypatch.setattr(_work, "ASK_BEFORE_KILL", 30.0)
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt=False)
    handle = tb.spawn(targets.spin_marked, str(path), backend="ray", policy=policy)
    await lines_of(path, 1)
    with caplog.at_level(logging.WARNING, logger="threadbridge"), anyio.fail_after(30):
        assert await handle.stop() is tb.Stage.KILLED
    assert handle.stopped_at is not None
    assert handle.stopped_at.splitlines()[0].endswith(", in spin_marked")
    (kill,) = [r for r in caplog.records if r.threadbridge["event"] == "kill"]  # type: ignore[attr-defined]
    assert kill.getMessage().endswith(" in spin_marked()")
    assert kill.threadbridge["function"] == "spin_marked"  # type: ignore[attr-defined]


async def test_rung3_right_after_rung1_still_kills(tmp_path: Path) -> None:
    """Ray drops a cancel that comes while an earlier one for the same task is still in
    flight: rung 3 straight after rung 1 (no graces at all) still kills the worker. The
    end is polled for, so that a rung 3 lost would fail here rather than hang."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt=False, interrupt_grace=0)
    handle = tb.spawn(targets.children_then_spin, str(path), backend="ray", policy=policy)
    (line,) = await lines_of(path, 1)
    worker, child = (int(x) for x in line.split())
    handle.cancel()
    with anyio.fail_after(20):
        while not handle.done():
            await anyio.sleep(0.01)
    assert handle.stage is tb.Stage.KILLED
    assert gone(worker)
    await until_gone(child)


RUNG1_WHILE_LOCKED = """
import signal, threading
from threadbridge._host import HostedJob
from threadbridge._target import TargetState
from threadbridge._token import _EVENT_LOCK
from threadbridge.ray import _task

_task.host()
state = TargetState(threading.Lock())
_task._current = _task._RemoteJob("control", HostedJob(1, state))
with _EVENT_LOCK:  # the task's thread is inside Token.wait() when Ray's SIGINT comes
    signal.raise_signal(signal.SIGINT)
assert state.token.wait(20), "rung 1 was lost"
print("set")
"""


def test_ray_cancel_landing_inside_token_wait_sets_the_token() -> None:
    """Ray's cancel arrives as SIGINT, whose handler runs in the task's thread between
    any two bytecodes, perhaps while that thread holds the token's lock inside
    Token.wait() (a target in sleep()): the handler takes no lock, so rung 1 is neither
    lost nor a deadlock. (In a subprocess: a deadlock there fails this test.)"""
    done = subprocess.run(
        [sys.executable, "-c", RUNG1_WHILE_LOCKED], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "set"


SHUTDOWN_AFTER_KILL = """
import os, sys, threading, time
import anyio, ray
import threadbridge as tb

def spin(path):
    with open(path, "w") as f:
        f.write("running")
    while True:
        pass

async def main(path):
    policy = tb.Policy(grace=0, interrupt=False, interrupt_grace=0)
    handle = tb.spawn(spin, path, backend="ray", policy=policy)
    with anyio.fail_after(60):
        while not os.path.exists(path):
            await anyio.sleep(0.01)
    handle.cancel()
    with anyio.fail_after(30):  # polled: a rung 3 lost fails here rather than hang
        while not handle.done():
            await anyio.sleep(0.01)
    assert handle.stage is tb.Stage.KILLED

if __name__ == "__main__":
    ray.init(address=sys.argv[1], log_to_driver=False)
    anyio.run(main, sys.argv[2], backend=sys.argv[3])
    ray.shutdown()
    deadline = time.monotonic() + 30
    while any(t.name == "threadbridge-ladder" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the ladder's timers never ran out"
        time.sleep(0.05)
    print("survived")
"""


async def test_ray_shutdown_right_after_a_kill_is_safe(
    tmp_path: Path, anyio_backend_name: str
) -> None:
    """A program may call ray.shutdown() as soon as its calls have returned: nothing of
    threadbridge's uses Ray after that, not even the ladder's timers as they run out (Ray
    ends the whole process when it is used after ray.shutdown())."""
    script = tmp_path / "prog.py"
    script.write_text(SHUTDOWN_AFTER_KILL)
    address = ray.get_runtime_context().gcs_address
    args = [sys.executable, str(script), address, str(tmp_path / "mark"), anyio_backend_name]
    with anyio.fail_after(90):
        done = await anyio.run_process(args, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().strip().endswith("survived")


async def test_a_task_waiting_for_resources_never_starts(tmp_path: Path) -> None:
    """With every CPU of the cluster taken, a cancelled task never runs: COOPERATIVE."""
    busy = [tmp_path / f"busy{i}" for i in range(CPUS)]
    hold = [tb.spawn(targets.cooperative, str(p), backend="ray") for p in busy]
    for p in busy:
        await lines_of(p, 1)
    waiting = tmp_path / "waiting"
    limiter = anyio.CapacityLimiter(10)
    handle = tb.spawn(targets.mark, str(waiting), "ran", backend="ray", limiter=limiter)
    with anyio.fail_after(20):
        assert await handle.stop() is tb.Stage.COOPERATIVE
        for h in hold:
            assert await h.stop() is tb.Stage.COOPERATIVE
    assert not waiting.exists()


async def test_worker_death_is_worker_crashed() -> None:
    with pytest.raises(tb.WorkerCrashed, match="died"):
        await tb.run_killable(targets.exit_with, 3, backend="ray")
    assert await tb.run_killable(targets.add, 1, 1, backend="ray") == 2


async def test_unserializable_argument_is_type_error_before_submitting() -> None:
    with pytest.raises(TypeError, match=r"argument 2 to add \(lock"):
        await tb.run_killable(targets.add, 1, threading.Lock(), backend="ray")  # type: ignore[arg-type]
    assert tb.stats().remote_tasks == 0


async def test_cancel_scope_around_a_ray_call(tmp_path: Path) -> None:
    """An ordinary cancel scope climbs the ladder; the await returns when the task ended."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    with anyio.move_on_after(30) as scope:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await tb.run_killable(targets.blocking_sleeper, str(path), backend="ray",
                                      policy=policy)  # fmt: skip

            tg.start_soon(call)
            await lines_of(path, 1)
            started = time.monotonic()
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert time.monotonic() - started < 20
    assert path.read_text().splitlines()[1:] == ["TargetCancelled", "finally"]
    assert tb.stats().remote_tasks == 0


async def test_default_limit_is_the_clusters_cpus() -> None:
    assert tb.default_limiter("ray").total_tokens == CPUS
    assert tb.default_limiter(RayBackend(num_cpus=2)).total_tokens == CPUS // 2


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="num_cpus"):
        RayBackend(num_cpus=-1)
    with pytest.raises(ValueError, match="max_retries"):
        RayBackend(max_retries=3)


async def test_the_limiter_bounds_tasks_in_flight(tmp_path: Path) -> None:
    """With a limiter of 1, the second task is not submitted until the first ended."""
    limiter = anyio.CapacityLimiter(1)
    first, second = tmp_path / "first", tmp_path / "second"
    a = tb.spawn(targets.busy_until_file, str(first), backend="ray", limiter=limiter)
    b = tb.spawn(targets.busy_until_file, str(second), backend="ray", limiter=limiter)
    await lines_of(first, 1)
    assert tb.stats().remote_tasks == 1
    assert not second.exists()
    Path(f"{first}.go").touch()
    await lines_of(second, 1)
    Path(f"{second}.go").touch()
    with anyio.fail_after(20):
        await a
        await b
    assert (a.stage, b.stage) == (tb.Stage.FINISHED, tb.Stage.FINISHED)


ON_DEMAND = """
import sys, anyio, ray, threadbridge as tb
async def main():
    print(await tb.run_killable(sum, [1, 2, 3], backend="ray"), ray.is_initialized())
anyio.run(main, backend=sys.argv[1])
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_program_not_connected_starts_a_local_cluster(tmp_path: Path, loop: str) -> None:
    """As Ray's own first call does: the program connects (here, to the running local
    cluster) or starts one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", ON_DEMAND, loop],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "True"]


@pytest.mark.threadbridge_loop_end_expected  # what it tests
async def test_tasks_of_a_loop_that_ends_climb_their_ladder(tmp_path: Path) -> None:
    """A loop that ends with a Ray task running: the task is stopped, not left running."""
    path = tmp_path / "log"

    async def program() -> tb.Handle[None]:
        policy = tb.Policy(grace=0.05, interrupt_grace=30)
        handle = tb.spawn(targets.blocking_sleeper, str(path), backend="ray", policy=policy)
        await lines_of(path, 1)
        return handle  # the loop ends with the task running

    handle = await anyio.to_thread.run_sync(anyio.run, program)
    with anyio.fail_after(20):
        while not handle.done():
            await anyio.sleep(0.01)
    assert handle.stage is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines()[1:] == ["TargetCancelled", "finally"]


def test_an_executor_and_call_on_ray(tmp_path: Path) -> None:
    """Plain code on Ray: Executor(backend="ray") and call(backend="ray") climb the same
    ladder, with no event loop in the caller."""
    policy = tb.Policy(grace=0.05, interrupt_grace=30)
    with tb.Executor("ray", max_workers=CPUS, policy=policy) as ex:
        assert ex.submit(targets.add, 1, 2).result(60) == 3
        path = tmp_path / "log"
        future = ex.submit(targets.blocking_sleeper, str(path))
        lines_soon(path, 1, timeout=60)
        assert future.cancel()
        assert future.wait_stopped(60)
        assert future.stage is tb.Stage.INTERRUPTED
    assert path.read_text().splitlines()[1:] == ["TargetCancelled", "finally"]
    spin = tmp_path / "spin"
    with pytest.raises(tb.CallTimeout) as info:
        tb.call(targets.spin_marked, str(spin), timeout=1, backend="ray", policy=policy)
    assert info.value.stage is tb.Stage.INTERRUPTED
