"""An existing Starlette service whose handlers call blocking code through
``asyncio.to_thread()``, made stoppable by one line: threadbridge's Executor as the
loop's default executor.

    python docs/examples/default_executor.py 8000
    curl 'http://127.0.0.1:8000/report?n=1000'         # {"result": ...}
    curl 'http://127.0.0.1:8000/report?n=1000000000'   # 504 at the deadline
    curl --max-time 1 'http://127.0.0.1:8000/report?n=1000000000&deadline=60'
                                                       # the client gives up
    curl 'http://127.0.0.1:8000/status'                # nothing left running

Cancelling the task that awaits ``asyncio.to_thread()`` now stops the blocking call: at
the deadline (``asyncio.wait_for``), and when the client goes away. Starlette does not
cancel a handler whose client has disconnected; ``cancel_on_disconnect()`` below does,
by watching the request for the ASGI ``http.disconnect`` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import threadbridge

T = TypeVar("T")
POLICY = threadbridge.Policy(grace=0.1, interrupt_grace=1.0)


def build_report(n: int) -> int:
    """The existing blocking code: CPU-bound, and deaf to cancellation."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """Await ``work()``; cancel it if the client disconnects first (then None)."""
    task = asyncio.ensure_future(work())

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():  # the client went away: nobody reads the answer
            return None
        raise  # the handler itself was cancelled (the server is stopping)
    finally:
        watcher.cancel()


async def report_endpoint(request: Request) -> JSONResponse:
    n = int(request.query_params.get("n", "1000"))
    deadline = float(request.query_params.get("deadline", "0.5"))

    async def work() -> JSONResponse:
        try:
            result = await asyncio.wait_for(asyncio.to_thread(build_report, n), deadline)
        except asyncio.TimeoutError:
            # build_report was cancelled at the deadline, and climbs its ladder.
            return JSONResponse({"error": f"deadline of {deadline}s exceeded"}, status_code=504)
        return JSONResponse({"result": result})

    response = await cancel_on_disconnect(request, work)
    return response or JSONResponse({"error": "the client went away"}, status_code=499)


async def status_endpoint(request: Request) -> JSONResponse:
    s = threadbridge.stats()
    stages = {stage.name: count for stage, count in s.stages.items()}
    return JSONResponse({"busy_threads": s.busy_threads, "stages": stages})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # The one line: asyncio.to_thread() and run_in_executor(None, ...) now stop their
    # work when the awaiting task is cancelled.
    asyncio.get_running_loop().set_default_executor(threadbridge.Executor(policy=POLICY))
    yield


app = Starlette(
    routes=[Route("/report", report_endpoint), Route("/status", status_endpoint)],
    lifespan=lifespan,
)

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")
