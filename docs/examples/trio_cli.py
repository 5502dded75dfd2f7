"""A command-line tool under trio whose blocking work stops cleanly on Ctrl-C.

    python docs/examples/trio_cli.py 100000000
    ^C

Ctrl-C cancels trio's main task; run_killable sets the target's token (rung 1), the
loop below sees it and returns, its ``finally`` reports how far it got, and only then
does KeyboardInterrupt reach the top, where the tool exits with status 130.
"""

from __future__ import annotations

import sys

import trio

import threadbridge


def checksum(n: int) -> int:
    """Blocking work that checks its token on every step."""
    total = done = 0
    print("checksum started", file=sys.stderr, flush=True)
    try:
        for done in range(n):
            if threadbridge.cancel_requested():
                raise threadbridge.TargetCancelled
            total = (total * 31 + done) % 1_000_003
        return total
    finally:
        print(f"checksum stopped after {done} steps", file=sys.stderr, flush=True)


async def main(n: int) -> None:
    print("working", flush=True)
    print(await threadbridge.run_killable(checksum, n))


if __name__ == "__main__":
    try:
        trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10**9)
    except KeyboardInterrupt:
        print("interrupted: the work has stopped", file=sys.stderr)
        sys.exit(130)
