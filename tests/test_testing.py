"""threadbridge.testing: leak checks, fast graces, waiting for targets, the plugin."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest

import threadbridge as tb
from threadbridge import testing

from .helpers import RungWatcher, Signal, block_in_c, join_soon_started, spin_forever

pytestmark = pytest.mark.anyio


async def test_leak_check_names_abandoned_thread() -> None:
    """An abandoned thread still alive after the block is reported with its target."""
    started = Signal()
    release = threading.Event()

    def stuck_in_c() -> None:
        block_in_c(started, release)

    leaking = testing.leak_check(timeout=0.05)
    try:
        leaking.__enter__()
        handle = tb.spawn(stuck_in_c, policy=tb.Policy(grace=0, interrupt_grace=0))
        await started.wait()
        assert await handle.stop() is tb.Stage.ABANDONED
        with pytest.raises(testing.LeakError, match=r"abandoned thread still running .*stuck_in_c"):
            leaking.__exit__(None, None, None)
        assert testing.active_count() == 1
    finally:
        release.set()
    with anyio.fail_after(10):
        await testing.wait_all_ended()
    assert testing.active_count() == 0


async def test_leak_check_names_running_thread_target() -> None:
    """A target still running (never awaited) is reported as such."""
    release = threading.Event()

    def forgotten() -> None:
        release.wait()

    try:
        with (
            pytest.raises(testing.LeakError, match=r"thread running .*forgotten"),
            testing.leak_check(timeout=0.05),
        ):
            tb.spawn(forgotten)
    finally:
        release.set()
    await testing.wait_all_ended(timeout=10)


async def test_leak_check_passes_when_clean() -> None:
    """Work that ended inside the block is no leak."""
    with testing.leak_check():
        assert await tb.run_killable(lambda: 3) == 3


async def test_wait_all_ended_times_out() -> None:
    """wait_all_ended raises TimeoutError while a target keeps running."""
    release = threading.Event()
    handle = tb.spawn(release.wait)
    try:
        with pytest.raises(TimeoutError):
            await testing.wait_all_ended(timeout=0.05)
    finally:
        release.set()
    await handle
    await testing.wait_all_ended(timeout=10)


async def test_fast_graces_caps_every_policy() -> None:
    """Inside fast_graces() a 30 s grace turns into a short one; outside it is back."""
    started = Signal()

    def target() -> None:
        started.set()
        spin_forever()

    with RungWatcher() as watcher, testing.fast_graces(grace=0.01, interrupt_grace=30):
        handle = tb.spawn(target, policy=tb.Policy(grace=30, interrupt_grace=30))
        await started.wait()
        with anyio.fail_after(10):  # far below the policy's own 30 s
            assert await handle.stop() is tb.Stage.INTERRUPTED
    assert any("0.01s" in m for m in watcher.messages)
    from threadbridge import _policy

    assert _policy.testing_caps is None


def test_set_testing_validates_and_undoes() -> None:
    """set_testing refuses bad graces and can be switched off."""
    from threadbridge import _policy

    with pytest.raises(ValueError, match="grace"):
        testing.set_testing(True, grace=-1)
    testing.set_testing(True, grace=0.5, interrupt_grace=0.5)
    assert _policy.effective_graces(tb.Policy(grace=3, interrupt_grace=0.1)) == (0.5, 0.1)
    testing.set_testing(False)
    assert _policy.testing_caps is None


PLUGIN_TEST = """
import threading, anyio, pytest, threadbridge as tb

started, release = threading.Event(), threading.Event()

def stubborn_target():
    started.set()
    release.wait()

@pytest.mark.anyio
async def test_leaks():
    handle = tb.spawn(stubborn_target, policy=tb.Policy(grace=0, interrupt_grace=0))
    await anyio.to_thread.run_sync(started.wait)
    await handle.stop()

def test_after():
    release.set()

@pytest.mark.anyio
async def test_fast(threadbridge_fast_graces, threadbridge_leak_check):
    with anyio.move_on_after(0.01):
        await tb.run_killable(tb.sleep, 60, policy=tb.Policy(grace=60))
"""


def test_pytest_plugin_reports_leaks(pytester: pytest.Pytester) -> None:
    """With threadbridge_leak_check = true, a leaking test errors and names the target."""
    pytester.makeini(
        "[pytest]\nthreadbridge_leak_check = true\nanyio_mode = auto\n"
        "filterwarnings =\n    ignore::pytest.PytestUnknownMarkWarning\n"
    )
    pytester.makeconftest(
        "import pytest\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n"
    )
    pytester.makepyfile(PLUGIN_TEST)
    result = pytester.runpytest_subprocess("-p", "anyio", "-q")
    result.stdout.fnmatch_lines(
        [
            "*threadbridge: left running after the test:",
            "*abandoned thread still running stubborn_target, for *s, at *",
        ]
    )
    result.assert_outcomes(passed=3, errors=1)


FIXTURE_CHILD_TEST = """
import subprocess, sys, pytest

@pytest.fixture(scope="session")
def helper_server():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()

def test_uses_the_server(helper_server):
    assert helper_server.poll() is None

def test_again(helper_server):
    assert helper_server.poll() is None

def test_leaves_its_own_child():
    global stray
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

def test_zz_cleanup():
    stray.kill()
    stray.wait()
"""


def test_plugin_baseline_is_taken_after_fixtures(pytester: pytest.Pytester) -> None:
    """A child process that a (session) fixture starts is not the test's leak; one the test
    itself leaves is."""
    pytester.makeini("[pytest]\nthreadbridge_leak_check = true\n")
    pytester.makepyfile(FIXTURE_CHILD_TEST)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*threadbridge: left running after the test:", "*child process*"])
    result.assert_outcomes(passed=4, errors=1)
    assert "test_leaves_its_own_child" in result.stdout.str().split("short test summary")[-1]


def test_the_suites_leak_check_waits_for_a_thread_listed_before_it_started() -> None:
    """threading.enumerate() lists a thread from the moment another thread calls start(),
    a moment before join() accepts it; the suite's leak check joined such a thread and
    failed a test with "cannot join thread before it is started". Its join waits."""
    for _ in range(300):
        thread = threading.Thread(target=lambda: None)
        starter = threading.Thread(target=thread.start)
        starter.start()
        while thread not in threading.enumerate() and starter.is_alive():
            pass  # catch it as early as enumerate() shows it
        join_soon_started(thread, 10)
        assert not thread.is_alive()
        assert thread.ident is not None
        starter.join()


SESSION_LOOP_TEST = """
import asyncio, time, pytest, threadbridge as tb

pytestmark = pytest.mark.asyncio(loop_scope="session")


def sleep_long(path):
    open(path, "w").close()
    time.sleep(60)


async def test_one():
    assert await tb.run_killable(int.__add__, 1, 2, backend="process") == 3


async def test_two():
    assert await tb.run_killable(int.__add__, 2, 2, backend="process") == 4


async def test_leaves_a_busy_worker(tmp_path):
    global handle
    path = tmp_path / "started"
    handle = tb.spawn(sleep_long, str(path), backend="process")
    while not path.exists():
        await asyncio.sleep(0.01)


async def test_zz_cleanup():
    await handle.stop()
"""


def test_plugin_keeps_the_idle_workers_of_a_loop_that_outlives_the_test(
    pytester: pytest.Pytester,
) -> None:
    """With one event loop for the whole session (pytest-asyncio's loop_scope="session",
    or an async fixture of wider scope), the pool's idle workers stay between tests: they
    are kept for the next call, not leaks (every test after the first process call failed
    after a 5 s wait). A worker still busy after its test is one."""
    pytester.makeini(
        "[pytest]\nthreadbridge_leak_check = true\nasyncio_mode = strict\n"
        "asyncio_default_fixture_loop_scope = session\n"
    )
    pytester.makepyfile(SESSION_LOOP_TEST)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-p", "no:anyio")
    result.stdout.fnmatch_lines(
        ["*threadbridge: left running after the test:", "*worker process*running sleep_long*"]
    )
    result.assert_outcomes(passed=4, errors=1)
    assert "test_leaves_a_busy_worker" in result.stdout.str().split("short test summary")[-1]


# A user's suite with three leaking tests (a file of its own: .ci/run also runs it under
# pytest-asyncio 0.23).
BLAME_TEST = (Path(__file__).parent / "plugin_cases" / "leaky_suite.py").read_text()


@pytest.mark.parametrize(
    "runner",
    [
        pytest.param(["-p", "anyio", "-p", "no:asyncio"], id="anyio"),
        pytest.param(["-p", "no:anyio", "-p", "asyncio"], id="pytest-asyncio"),
    ],
)
def test_plugin_blames_the_test_that_leaked_once_and_stops_it(
    pytester: pytest.Pytester, runner: list[str]
) -> None:
    """Each leak fails the test that left it, in a few lines naming the target and where
    it was; the plugin then stops it (an abandoned thread runs on, and is not blamed on
    the tests after it): every later test passes. A process call forgotten in a test is
    a leak whichever plugin runs the loop (pytest-asyncio ends the test's loop, which
    stops the call; anyio's loop may outlive the test, and the call runs on)."""
    ini = "[pytest]\nthreadbridge_leak_check = true\n"
    if "asyncio" in runner:
        ini += "asyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    else:
        ini += "anyio_mode = auto\n"
    pytester.makeini(ini + "filterwarnings =\n    ignore::pytest.PytestUnknownMarkWarning\n")
    pytester.makeconftest(
        "import pytest\n@pytest.fixture\ndef anyio_backend():\n    return 'asyncio'\n"
    )
    pytester.makepyfile(BLAME_TEST)
    result = pytester.runpytest_subprocess(
        "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *runner
    )
    # A leak is an error in the teardown of the test that left it (the test itself ran).
    result.assert_outcomes(passed=8, errors=3)
    out = result.stdout.str()
    summary = out.split("short test summary")[-1]
    for name in ("test_a_forgets", "test_b_forgets", "test_c_forgets"):
        assert summary.count(name) == 1
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_forgets_a_blocked_thread*",
            "threadbridge: left running after the test:",
            "  thread running forgotten, for *s, at test_plugin_blames*.py:* in forgotten(),"
            " in threading.py:* in wait()",
            "then stopped by the plugin, on fast graces: forgotten ABANDONED *",
            "*ERROR at teardown of test_b_forgets_a_spinning_thread*",
            "threadbridge: left running after the test:",
            "  thread running spin, for *s, at test_plugin_blames*.py:* in spin()",
            "then stopped by the plugin, on fast graces: spin INTERRUPTED",
            "*ERROR at teardown of test_c_forgets_a_process_call*",
            "threadbridge: left running after the test:",
            "  worker process * running spin*",
        ]
    )
    # A few lines each, none of them the plugin's own source.
    assert "def pytest_runtest_teardown" not in out
    assert "_plugin.py" not in out
