"""The recipes in docs/examples, run for real: an ASGI service under uvicorn, a trio
command-line tool stopped by Ctrl-C, and a user's test suite."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.text import TextReceiveStream

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_until(stream: ByteReceiveStream | None, needle: str, seen: list[str]) -> None:
    """Read text from a child's pipe until ``needle`` appears (or fail after 30 s)."""
    assert stream is not None
    if needle in "".join(seen):  # read already, with what an earlier wait read
        return
    with anyio.fail_after(30):
        async for chunk in TextReceiveStream(stream):
            seen.append(chunk)
            if needle in "".join(seen):
                return
    raise AssertionError(f"{needle!r} never came; got {''.join(seen)!r}")


async def stop(process: Process) -> None:
    if process.returncode is None:
        process.terminate()
    with anyio.fail_after(10):
        await process.wait()
    await process.aclose()


@contextlib.asynccontextmanager
async def serving(example: str, *args: str) -> AsyncIterator[httpx.AsyncClient]:
    """Run an ASGI example under uvicorn on a free port; a client of it."""
    port = free_port()
    process = await anyio.open_process([sys.executable, str(EXAMPLES / example), str(port), *args])
    try:
        await read_until(process.stderr, "Uvicorn running on", [])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        await stop(process)


async def test_asgi_deadline_gives_504_and_the_work_has_stopped() -> None:
    # A deadline of 3 s: the quick request must meet it on a loaded machine too (a
    # loaded free-threaded build missed the example's 0.5 s with its first request).
    async with serving("asgi_deadline.py", "3") as client:
        fast = await client.get("/crunch", params={"n": 1000})
        assert fast.status_code == 200
        assert fast.json() == {"result": sum(i * i % 7 for i in range(1000))}

        started = anyio.current_time()
        slow = await client.get("/crunch", params={"n": 10**12})
        took = anyio.current_time() - started
        assert slow.status_code == 504, slow.text
        assert "deadline" in slow.json()["error"]
        assert took < 15  # deadline 3 s + grace 0.1 s, with a generous margin

        # The 504 was sent only after the crunch had stopped: nothing runs on.
        status = (await client.get("/status")).json()
        assert status["busy_threads"] == 0
        assert status["abandoned_threads"] == 0
        assert status["stages"]["INTERRUPTED"] == 1
        assert status["stages"]["FINISHED"] == 1


async def status_when(client: httpx.AsyncClient, ready: Callable[[Any], bool]) -> Any:
    """The service's /status once ``ready(status)`` holds (bounded)."""
    with anyio.fail_after(30):
        while True:
            status = (await client.get("/status")).json()
            if ready(status):
                return status
            await anyio.sleep(0.02)


async def test_default_executor_stops_to_thread_work_at_deadline_and_disconnect() -> None:
    async with serving("default_executor.py") as client:
        fast = await client.get("/report", params={"n": 1000})
        assert fast.json() == {"result": sum(i * i % 7 for i in range(1000))}

        slow = await client.get("/report", params={"n": 10**12})
        assert slow.status_code == 504, slow.text
        # asyncio.to_thread() returned at the cancel; the work stops by its ladder.
        status = await status_when(client, lambda s: s["stages"]["INTERRUPTED"] == 1)
        assert status["busy_threads"] == 0

        # The client gives up long before the deadline: the handler is cancelled on
        # the disconnect, and the work stops.
        params = {"n": 10**12, "deadline": 600}
        async with httpx.AsyncClient(base_url=client.base_url, timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.get("/report", params=params)
        status = await status_when(client, lambda s: s["stages"]["INTERRUPTED"] == 2)
        assert status["busy_threads"] == 0
        assert status["stages"]["FINISHED"] == 1


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
async def test_trio_cli_stops_cleanly_on_ctrl_c() -> None:
    # As typed in a terminal: SIGINT at its default. A suite run as a background job (a
    # shell's `cmd &`) hands its children SIGINT ignored, and Python keeps it so.
    launch = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    cli = str(EXAMPLES / "trio_cli.py")
    process = await anyio.open_process(
        [sys.executable, "-X", "faulthandler", "-c", launch, cli, str(10**12)]
    )
    err: list[str] = []
    try:
        await read_until(process.stderr, "checksum started", err)
        process.send_signal(signal.SIGINT)
        try:
            await read_until(process.stderr, "interrupted: the work has stopped", err)
        except TimeoutError:
            # Where is it stuck? faulthandler prints every thread's stack on SIGABRT.
            process.send_signal(signal.SIGABRT)
            with anyio.move_on_after(10):
                await read_until(process.stderr, "<never>", err)
            raise AssertionError("no clean stop after Ctrl-C:\n" + "".join(err)) from None
        with anyio.fail_after(10):
            assert await process.wait() == 130
    finally:
        await stop(process)
    text = "".join(err)
    assert text.index("checksum stopped after") < text.index("interrupted: the work has stopped")
    assert "Traceback" not in text


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGUSR1")
async def test_running_dump_shows_where_each_target_is(anyio_backend: str) -> None:
    process = await anyio.open_process(
        [sys.executable, str(EXAMPLES / "running_dump.py"), anyio_backend]
    )
    err: list[str] = []
    try:
        await read_until(process.stdout, "kill -USR1", [])
        started: list[str] = []
        await read_until(process.stderr, "poll_forever started", started)
        await read_until(process.stderr, "crunch started", started)
        process.send_signal(signal.SIGUSR1)
        await read_until(process.stderr, "in crunch\n", err)
        await read_until(process.stderr, "in poll_forever\n", err)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert await process.wait() == 0
    finally:
        await stop(process)
    text = "".join(err)
    # One record per target, each with its stack, its own frames only.
    assert "service: <threadbridge.RunningTarget poll_forever on thread" in text
    assert "service: <threadbridge.RunningTarget crunch on process" in text
    assert "time.sleep(seconds)" in text
    assert "_thread.py" not in text
    assert "_host.py" not in text


async def test_users_suite_with_threadbridge_testing_passes() -> None:
    result = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(EXAMPLES / "test_with_threadbridge.py"),
        ],
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "6 passed" in out
