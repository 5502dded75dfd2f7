"""The recipes in docs/examples, run for real: an ASGI service under uvicorn, a trio
command-line tool stopped by Ctrl-C, and a user's test suite."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

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


async def test_asgi_deadline_gives_504_and_the_work_has_stopped() -> None:
    port = free_port()
    process = await anyio.open_process(
        [sys.executable, str(EXAMPLES / "asgi_deadline.py"), str(port)]
    )
    try:
        await read_until(process.stderr, "Uvicorn running on", [])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            fast = await client.get("/crunch", params={"n": 1000})
            assert fast.status_code == 200
            assert fast.json() == {"result": sum(i * i % 7 for i in range(1000))}

            started = anyio.current_time()
            slow = await client.get("/crunch", params={"n": 10**12})
            took = anyio.current_time() - started
            assert slow.status_code == 504, slow.text
            assert "deadline" in slow.json()["error"]
            assert took < 10  # deadline 0.5 s + grace 0.1 s, with a generous margin

            # The 504 was sent only after the crunch had stopped: nothing runs on.
            status = (await client.get("/status")).json()
            assert status["busy_threads"] == 0
            assert status["abandoned_threads"] == 0
            assert status["stages"]["INTERRUPTED"] == 1
            assert status["stages"]["FINISHED"] == 1
    finally:
        await stop(process)


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
