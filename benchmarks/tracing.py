"""What OpenTelemetry costs a warm thread call: CPU instructions per call (callgrind, as
benchmarks/instructions.py counts them) when the program has not imported opentelemetry,
when it has but set no tracer provider, and with the SDK's provider recording a span per
call (no exporter: the SDK's own cost of a span is in the figure, an exporter's is not).
Against the last: the same calls with threadbridge's spans off and the program opening a
bare span around each call itself, which is the SDK's share. The garbage collector is
off in every run (the SDK's objects made the counts of two runs differ by a third).

Run by hand (needs valgrind and opentelemetry-sdk):

    python benchmarks/tracing.py [--rounds 5]

Nothing here is asserted.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _table import print_table
from instructions import figures, per_call_rounds, rounds_from_args

PROGRAM = r"""
import gc, sys, anyio, threadbridge as tb
gc.disable()
mode, loop, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode != "none":
    from opentelemetry import trace
if mode in ("sdk", "bare"):
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("bench")
if mode == "bare":
    from threadbridge import _otel
    _otel.start = lambda name: None  # threadbridge's spans off

def noop():
    return None

async def call():
    if mode == "bare":
        span = tracer.start_span("noop")
        await tb.run_killable(noop)
        span.end()
    else:
        await tb.run_killable(noop)

async def main():
    for _ in range(50):
        await call()
    for _ in range(n):
        await call()

anyio.run(main, backend=loop)
"""

MODES = {
    "none": "opentelemetry not imported",
    "api": "imported, no provider set",
    "sdk": "SDK provider: a span per call",
    "bare": "SDK provider, the program's own bare span",
}
SHORT, LONG = 200, 1200


def main() -> None:
    rounds = rounds_from_args(__doc__, 5)
    rows = []
    for loop in ("asyncio", "trio"):
        costs = per_call_rounds(PROGRAM, MODES, loop, (SHORT, LONG), rounds)
        base = statistics.median(costs["none"])
        for mode, what in MODES.items():
            cost = statistics.median(costs[mode])
            rows.append(
                (f"{loop}: {what}", *figures(costs[mode]), f"{(cost - base) / base * 100:+.1f}%")
            )
        sdk, bare = statistics.median(costs["sdk"]), statistics.median(costs["bare"])
        rows.append(
            (
                f"{loop}: threadbridge's share (SDK span per call minus bare span)",
                f"{(sdk - bare) / 1000:.1f} k",
                "",
                f"{(sdk - bare) / base * 100:+.1f}%",
            )
        )
    print(
        f"Python {sys.version.split()[0]}: instructions per warm thread call (callgrind), "
        f"median of {rounds} rounds"
    )
    print_table(("what", "per call", "range", "vs not imported"), rows)


if __name__ == "__main__":
    main()
