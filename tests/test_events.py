"""Every ladder step is a record on the ``threadbridge`` logger, with structured fields in
``record.threadbridge`` (``extra={"threadbridge": ...}``); the records of rungs 2 and 3
say where the target was. On both loops, threads and worker processes."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import threadbridge as tb

from . import targets
from .helpers import Blocked, until_running
from .test_process import lines_of

pytestmark = pytest.mark.anyio

FIELDS = {"event", "target", "backend", "rung", "stage", "elapsed", "pid"}
WHERE = {"file", "line", "function", "stack"}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[dict[str, Any]] = []
        self.messages: list[str] = []  # of the same records
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "threadbridge", None)
        if fields is not None:
            with self.guard:
                self.seen.append({**fields, "level": record.levelname})
                self.messages.append(record.getMessage())

    def events(self) -> list[str]:
        with self.guard:
            return [r["event"] for r in self.seen]


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("threadbridge")
    handler = Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_call_that_ends_by_itself_says_nothing(records: Records) -> None:
    assert await tb.run_killable(targets.add, 1, 2) == 3
    assert records.seen == []


async def test_a_cooperative_stop_is_two_records(records: Records) -> None:
    started = threading.Event()

    def target() -> None:
        started.set()
        tb.current_token().wait()

    handle = tb.spawn(target, policy=tb.Policy(grace=30))
    await anyio.to_thread.run_sync(started.wait)
    assert await handle.stop() is tb.Stage.COOPERATIVE
    stop, stopped = records.seen
    assert set(stop) - {"level"} == FIELDS  # no rung past 1: nowhere to say
    assert (stop["event"], stop["rung"], stop["stage"], stop["level"]) == (
        "stop",
        1,
        "running",
        "DEBUG",
    )
    assert (stop["backend"], stop["pid"], stop["target"]) == ("thread", os.getpid(), handle.name)
    assert (stopped["event"], stopped["stage"]) == ("stopped", "cooperative")
    assert stopped["elapsed"] >= stop["elapsed"] >= 0


async def test_rung2_on_a_thread_says_where(records: Records, tmp_path: Path) -> None:
    path = tmp_path / "log"
    handle = tb.spawn(targets.spin_marked, str(path), policy=tb.Policy(grace=0, interrupt_grace=30))
    await lines_of(path, 1)
    # In its loop, past mark() (which a loaded machine may still be returning from).
    (target,) = tb.running()
    assert target.thread_id is not None
    await until_running(target.thread_id, targets.spin_marked.__code__, 3)
    assert await handle.stop() is tb.Stage.INTERRUPTED
    assert records.events() == ["stop", "interrupt", "stopped"]
    interrupt = records.seen[1]
    assert set(interrupt) - {"level"} == FIELDS | WHERE
    assert (interrupt["level"], interrupt["rung"], interrupt["function"]) == (
        "INFO",
        2,
        "spin_marked",
    )
    assert interrupt["file"] == targets.__file__
    assert interrupt["stack"] == handle.stopped_at


async def test_rung3_on_a_thread_says_where(records: Records) -> None:
    blocked = Blocked()
    handle = await blocked.abandoned()
    blocked.release.set()
    assert records.events() == ["stop", "interrupt", "abandon", "stopped"]
    abandon = records.seen[2]
    assert (abandon["level"], abandon["rung"], abandon["function"]) == ("WARNING", 3, "__call__")
    assert abandon["stack"] == handle.stopped_at


async def until_spinning_in_worker() -> None:
    """Until the one running target, spin_marked in a worker, is in its loop: past the
    mark() that says it started, which a loaded machine may still be returning from.
    Asked of the worker (where() waits for its answer: from a thread)."""
    (target,) = tb.running()
    with anyio.fail_after(30):
        while True:
            stack = await anyio.to_thread.run_sync(target.where)
            frames = [line for line in stack.splitlines() if line.lstrip().startswith('File "')]
            if frames and frames[-1].endswith(", in spin_marked"):
                return


async def test_a_worker_process_says_where_as_its_answer_comes(
    records: Records, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt_grace=30)
    handle = tb.spawn(targets.spin_marked, str(path), backend="process", policy=policy)
    await lines_of(path, 1)
    await until_spinning_in_worker()
    assert await handle.stop() is tb.Stage.INTERRUPTED
    # Rung 2 is said before the signal (the worker has not said where yet); then where.
    assert records.events() == ["stop", "interrupt", "where", "stopped"]
    interrupt, where = records.seen[1], records.seen[2]
    assert (interrupt["backend"], interrupt["rung"]) == ("process", 2)
    assert interrupt["pid"] not in (None, os.getpid())
    assert "stack" not in interrupt
    assert (where["function"], where["pid"]) == ("spin_marked", interrupt["pid"])
    assert where["stack"] == handle.stopped_at


async def test_a_worker_process_killed_without_rung2_says_where(
    records: Records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no rung 2 to say it (interrupt=False), rung 3 asks the worker where its
    target is before the kill: its record says it, and stopped_at keeps it."""
    from threadbridge import _worker_process

    # The kill follows the answer: a loaded machine may take longer than the 0.2 s the
    # kill waits for it by default (then nothing is said, as for a target that holds
    # the GIL, tested below).
    monkeypatch.setattr(_worker_process, "ASK_BEFORE_KILL", 30.0)
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt=False)
    handle = tb.spawn(targets.spin_marked, str(path), backend="process", policy=policy)
    await lines_of(path, 1)
    await until_spinning_in_worker()
    assert await handle.stop() is tb.Stage.KILLED
    assert records.events() == ["stop", "kill", "stopped"]
    kill = records.seen[1]
    assert (kill["level"], kill["rung"], kill["function"]) == ("WARNING", 3, "spin_marked")
    assert kill["file"] == targets.__file__
    assert kill["stack"] == handle.stopped_at
    assert records.messages[1].endswith(f"; it was at targets.py:{kill['line']} in spin_marked()")


async def test_a_worker_that_cannot_say_where_is_killed_all_the_same(
    records: Records, tmp_path: Path
) -> None:
    """A target that holds the GIL in one C call keeps its worker's control thread from
    answering: rung 3 kills it after a short wait, with nothing said of where it was."""
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt=False)
    handle = tb.spawn(targets.busy_then_c_call, str(path), backend="process", policy=policy)
    await lines_of(path, 1)
    with anyio.fail_after(30):
        assert await handle.stop() is tb.Stage.KILLED
    assert records.events() == ["stop", "kill", "stopped"]
    assert "stack" not in records.seen[1]
    assert handle.stopped_at is None
