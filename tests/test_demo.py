"""`python -m threadbridge demo` runs and shows each target stopped at its rung."""

from __future__ import annotations

import subprocess
import sys


def test_demo_table() -> None:
    """The demo prints one row per target and loop, each at the expected stage. With
    graces of a second each, not the demo's default fifths: a target thread that a
    loaded machine leaves waiting for its CPU longer than a grace climbs a rung higher
    (a fresh-clone CI run, six suites on two CPUs, found "checks its token" ABANDONED)."""
    out = subprocess.run(
        [sys.executable, "-m", "threadbridge", "demo", "--grace", "1", "--interrupt-grace", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line for line in out.stdout.splitlines() if line.startswith(("asyncio", "trio"))]
    process_rows = [r for r in rows if "/proc" in r]
    rows = [r for r in rows if "/proc" not in r]
    expected = {
        "checks its token": "COOPERATIVE",
        "pure-Python loop": "INTERRUPTED",
        "blocked in time.sleep": "ABANDONED",
        "swallows TargetCancelled": "ABANDONED",
    }
    for loop in ("asyncio", "trio"):
        mine = [r for r in rows if r.startswith(loop)]
        assert len(mine) == len(expected), out.stdout
        for title, stage in expected.items():
            (row,) = [r for r in mine if title in r]
            assert stage in row, row
    for loop in ("asyncio", "trio"):
        (sleeper,) = [r for r in process_rows if r.startswith(loop) and "time.sleep" in r]
        assert "INTERRUPTED" in sleeper
        assert "finally ran in the worker" in sleeper
        (killed,) = [r for r in process_rows if r.startswith(loop) and "SIGTERM" in r]
        assert "KILLED" in killed
        assert "killed, reaped" in killed
    assert out.stderr == ""
    assert "grace=1.0s before rung 2, interrupt_grace=1.0s before rung 3" in out.stdout


def test_a_bad_grace_is_a_usage_error() -> None:
    """A grace that is no number of seconds is refused with the reason, before any work."""
    out = subprocess.run(
        [sys.executable, "-m", "threadbridge", "demo", "--grace", "-1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "grace" in out.stderr
    assert out.stdout == ""


def test_usage_error() -> None:
    """An unknown command exits non-zero with usage text."""
    out = subprocess.run(
        [sys.executable, "-m", "threadbridge", "nonsense"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "usage" in out.stderr
