"""An ASGI service whose endpoint runs blocking work under a deadline.

    python docs/examples/asgi_deadline.py 8000 [DEADLINE]
    curl 'http://127.0.0.1:8000/crunch?n=1000'        # {"result": ...}
    curl 'http://127.0.0.1:8000/crunch?n=1000000000'  # 504 after the deadline
    curl 'http://127.0.0.1:8000/status'               # nothing left running

The crunch is a pure-Python loop that never looks at its token, the worst case: past
the deadline, rung 1 asks it to stop, rung 2 raises inside it, and only when it has
really stopped does the endpoint answer 504.
"""

from __future__ import annotations

import sys

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import threadbridge

# Seconds a request may take (the second argument, if given).
DEADLINE = float(sys.argv[2]) if __name__ == "__main__" and len(sys.argv) > 2 else 0.5
POLICY = threadbridge.Policy(grace=0.1, interrupt_grace=1.0)


def crunch(n: int) -> int:
    """Blocking, CPU-bound, and deaf to cancellation."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


async def crunch_endpoint(request: Request) -> JSONResponse:
    n = int(request.query_params.get("n", "1000"))
    with anyio.move_on_after(DEADLINE) as scope:
        result = await threadbridge.run_killable(crunch, n, policy=POLICY)
    if scope.cancelled_caught:
        # run_killable returned only once crunch had stopped: nothing runs on.
        return JSONResponse({"error": f"deadline of {DEADLINE}s exceeded"}, status_code=504)
    return JSONResponse({"result": result})


async def status_endpoint(request: Request) -> JSONResponse:
    s = threadbridge.stats()
    return JSONResponse(
        {
            "busy_threads": s.busy_threads,
            "abandoned_threads": s.abandoned_threads,
            "stages": {stage.name: count for stage, count in s.stages.items()},
        }
    )


app = Starlette(routes=[Route("/crunch", crunch_endpoint), Route("/status", status_endpoint)])

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")
