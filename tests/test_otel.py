"""OpenTelemetry: with a tracer provider set, each call is a span (a child of the
caller's), each step of its ladder an event of it, and the trace context travels to the
target: threads, worker processes (and Ray, in test_ray.py). Without a provider, nothing;
without opentelemetry imported, threadbridge imports none of it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import threadbridge as tb

from . import targets
from .helpers import Blocked
from .test_process import lines_of
from .tracing import Spans


def ids(span: Any) -> tuple[int, int]:
    context = span.get_span_context() if hasattr(span, "get_span_context") else span.context
    return context.trace_id, context.span_id


@pytest.mark.anyio
async def test_a_thread_call_is_a_span_whose_target_opens_children(spans: Spans) -> None:
    with trace.get_tracer("tests").start_as_current_span("outer") as outer:
        inner = await tb.run_killable(targets.open_child_span)
    call = spans.named("open_child_span")
    assert call.parent is not None
    assert call.parent.span_id == ids(outer)[1]
    assert inner == ids(call)  # the target's span: same trace, the call's span its parent
    assert spans.named("inner").parent.span_id == ids(call)[1]  # type: ignore[union-attr]
    assert not call.attributes  # it ended by itself: nothing to add to its name
    assert call.status.status_code is StatusCode.UNSET
    assert call.events == ()


@pytest.mark.anyio
async def test_the_context_travels_to_a_worker_process(spans: Spans) -> None:
    with trace.get_tracer("tests").start_as_current_span("outer"):
        seen = await tb.run_killable(targets.current_trace, backend="process")
    call = spans.named("current_trace")
    assert seen == ids(call)


@pytest.mark.anyio
async def test_spans_a_worker_opens_are_children_of_the_call(spans: Spans) -> None:
    async with tb.ProcessPool(1, initializer=targets.install_tracer_provider) as pool:
        inner = await tb.run_killable(targets.open_child_span, backend=pool)
        # The next job carries its own context, not the last one's.
        again = await tb.run_killable(targets.open_child_span, backend=pool)
    first, second = (s for s in spans.exporter.get_finished_spans() if s.name == "open_child_span")
    assert (inner, again) == (ids(first), ids(second))
    assert inner != again


@pytest.mark.anyio
async def test_without_a_provider_there_is_no_span_and_no_context() -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert await tb.run_killable(targets.current_trace) == (0, 0)
    assert await tb.run_killable(targets.current_trace, backend="process") == (0, 0)


@pytest.mark.anyio
async def test_a_target_that_raises_is_an_error_span(spans: Spans) -> None:
    with pytest.raises(targets.CustomError, match="boom"):
        await tb.run_killable(targets.raise_custom, "boom")
    call = spans.named("raise_custom")
    assert call.status.status_code is StatusCode.ERROR
    assert [event.name for event in call.events] == ["exception"]
    assert call.events[0].attributes["exception.type"] == "tests.targets.CustomError"  # type: ignore[index]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["thread", "process"])
async def test_rungs_are_events_that_say_where(
    spans: Spans, backend: Literal["thread", "process"], tmp_path: Path
) -> None:
    path = tmp_path / "log"
    policy = tb.Policy(grace=0, interrupt_grace=30)
    handle = tb.spawn(targets.spin_marked, str(path), backend=backend, policy=policy)
    await lines_of(path, 1)
    assert await handle.stop() is tb.Stage.INTERRUPTED
    call = spans.named("spin_marked")
    names = [event.name for event in call.events]
    where = ["threadbridge.where"] if backend == "process" else []
    assert names == ["threadbridge.stop", "threadbridge.interrupt", *where, "threadbridge.stopped"]
    stop, said = call.events[0], call.events[-2]
    assert stop.attributes is not None
    assert stop.attributes["threadbridge.rung"] == 1
    assert said.attributes is not None
    assert said.attributes["code.function.name"] == "spin_marked"
    assert said.attributes["code.stacktrace"] == handle.stopped_at
    assert call.attributes is not None
    assert dict(call.attributes) == {
        "threadbridge.stage": "interrupted",
        "threadbridge.backend": backend,
    }
    assert call.status.status_code is StatusCode.UNSET  # stopped as asked: no error


@pytest.mark.anyio
async def test_rung3_is_an_event(spans: Spans) -> None:
    blocked = Blocked()
    handle = await blocked.abandoned()
    blocked.release.set()
    assert spans.events(handle.name) == [
        "threadbridge.stop",
        "threadbridge.interrupt",
        "threadbridge.abandon",
        "threadbridge.stopped",
    ]


@pytest.mark.anyio
async def test_a_cancel_scope_ends_the_span_once_stopped(spans: Spans) -> None:
    started = threading.Event()

    def waits() -> None:
        started.set()
        tb.current_token().wait()

    with anyio.CancelScope() as scope:

        async def cancel_when_started() -> None:
            await anyio.to_thread.run_sync(started.wait)
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_when_started)
            await tb.run_killable(waits)
    assert scope.cancelled_caught
    assert spans.events(waits.__qualname__) == [
        "threadbridge.stop",
        "threadbridge.stopped",
    ]


@pytest.mark.anyio
async def test_an_api_that_keeps_its_provider_elsewhere_is_asked(
    spans: Spans, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the API keeps no provider where threadbridge reads it first, it asks the
    API each call (and keeps one tracer per provider)."""
    from threadbridge import _otel

    monkeypatch.setattr(_otel, "_PROVIDER", "_no_such_attribute")
    for _ in range(2):
        await tb.run_killable(targets.add, 1, 2)
    assert len([s for s in spans.exporter.get_finished_spans() if s.name == "add"]) == 2


def baggage_and_span() -> tuple[object, tuple[int, int]]:
    """The target's view: a baggage entry of the caller's context, and its current span."""
    from opentelemetry import baggage

    return baggage.get_baggage("tenant"), ids(trace.get_current_span())


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["direct", "through the API's functions"])
async def test_the_callers_context_comes_with_the_span(
    spans: Spans, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    """The span is made current in the target's context, which keeps what else the
    caller's OpenTelemetry context holds, and the caller's is left as it was; also where
    the API keeps its current context elsewhere than threadbridge looks first. (An
    Executor's call starts from an empty context:
    test_an_executor_call_is_a_child_of_the_submitters_span.)"""
    from opentelemetry import baggage, context

    from threadbridge import _otel

    if api != "direct":
        monkeypatch.setattr(_otel, "_current", None)
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        before = context.get_current()
        seen = await tb.run_killable(baggage_and_span)
        assert context.get_current() is before  # the caller's own is left as it was
    finally:
        context.detach(token)
    assert seen == ("acme", ids(spans.named("baggage_and_span")))


def test_an_executor_call_is_a_child_of_the_submitters_span(spans: Spans) -> None:
    tracer = trace.get_tracer("tests")
    with tb.Executor(max_workers=2) as executor, tracer.start_as_current_span("outer") as outer:
        inner = executor.submit(targets.open_child_span).result()
    call = spans.named("open_child_span")
    assert call.parent is not None
    assert call.parent.span_id == ids(outer)[1]
    assert inner == ids(call)


def test_a_sync_call_with_a_timeout_ends_its_span_stopped(spans: Spans) -> None:
    def waits() -> None:
        tb.current_token().wait()

    with pytest.raises(TimeoutError):
        tb.call(waits, timeout=0.05)
    assert spans.events(waits.__qualname__) == ["threadbridge.stop", "threadbridge.stopped"]
    call = spans.named(waits.__qualname__)
    assert call.attributes is not None
    assert call.attributes["threadbridge.stage"] == "cooperative"


def test_a_refused_call_ends_its_span(spans: Spans) -> None:
    executor = tb.Executor(max_workers=1)
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(targets.add, 1, 2)
    call = spans.named("add")
    assert call.attributes is not None
    assert call.attributes["threadbridge.stage"] == "not started"
    assert call.status.status_code is StatusCode.ERROR


def test_threadbridge_imports_no_opentelemetry_of_its_own(tmp_path: Path) -> None:
    program = textwrap.dedent(
        """
        import json, sys
        import anyio, threadbridge as tb
        from tests import targets

        async def main():
            await tb.run_killable(targets.add, 1, 2)
            handle = tb.spawn(targets.cooperative, "/dev/null", policy=tb.Policy(grace=5))
            await handle.stop()
            return await tb.run_killable(targets.otel_imported, backend="process")

        in_worker = anyio.run(main)
        print(json.dumps([targets.otel_imported(), in_worker]))
        """
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [[], []]
