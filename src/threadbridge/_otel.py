"""OpenTelemetry, for a program that traces: a span per call, an event per ladder step,
and the trace context carried to the target (a thread, a worker process, a Ray task).

Nothing here imports opentelemetry on the caller's side. A program that traces has
imported ``opentelemetry.trace`` already (to set its tracer provider); one that has not
pays one dictionary lookup per call and gets no spans. Where a target runs away from
the caller, the host imports opentelemetry only for a job that carries a trace context.

Imported where targets run: it stays light (no anyio, no trio).
"""

from __future__ import annotations

import contextvars
import sys
from typing import Any

TRACE = "opentelemetry.trace"  # in sys.modules once the program uses OpenTelemetry

_modules = sys.modules
_tracer: tuple[object, Any] | None = None  # (the provider, its tracer for threadbridge)
_UNKNOWN = object()
_PROVIDER = "_TRACER_PROVIDER"  # where opentelemetry-api 1.x keeps the provider set

# Record fields to span attributes: OpenTelemetry's names where it has one.
_ATTRIBUTES = {
    "backend": "threadbridge.backend",
    "rung": "threadbridge.rung",
    "stage": "threadbridge.stage",
    "elapsed": "threadbridge.elapsed",
    "pid": "process.pid",
    "file": "code.file.path",
    "line": "code.line.number",
    "function": "code.function.name",
    "stack": "code.stacktrace",
}


def start(name: str) -> Any:
    """A span for a call of ``name``, child of the caller's current span; None if the
    program traces nothing (no tracer provider set)."""
    tracer = _current_tracer()
    # Named after the target, and no attribute at its start: the SDK checks each
    # attribute it is given, and one more at the start cost a sixth of a thread call.
    return None if tracer is None else tracer.start_span(name)


def tracing() -> bool:
    """Whether ``start()`` would make a span: opentelemetry is imported and a tracer
    provider set. (A program may import it, or a library it uses may, and set none.)"""
    return _current_tracer() is not None


def _current_tracer() -> Any:
    """threadbridge's tracer of the provider set now; None if opentelemetry is not
    imported or no provider is set."""
    trace = _modules.get(TRACE)
    if trace is None:
        return None
    # The API's own record of the provider set, read first: get_tracer_provider() looks
    # for one in the environment each time none is set, which would cost a program that
    # imported opentelemetry without setting a provider 7% of a thread call.
    provider: Any = getattr(trace, _PROVIDER, _UNKNOWN)
    cached = _tracer
    if cached is None or cached[0] is not provider:
        cached = _tracer_of(trace, provider)
    return cached[1]


def _tracer_of(trace: Any, provider: Any) -> tuple[object, Any]:
    """(provider, threadbridge's tracer of it, or None if none is set), remembered: the
    checks of a provider are of abstract classes, and cost as much as the rest of a
    call's span. (An API that keeps its provider elsewhere is asked each time.)"""
    global _tracer
    if provider is _UNKNOWN:
        provider = trace.get_tracer_provider()
    cached = _tracer
    if cached is not None and cached[0] is provider:
        return cached
    tracer = None  # none set: every span would be a no-op
    if provider is not None and not isinstance(
        provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    ):
        tracer = provider.get_tracer("threadbridge", _version())
    cached = _tracer = (provider, tracer)
    return cached


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("threadbridge")
    except metadata.PackageNotFoundError:  # run from a source tree
        return None


_current: Any = _UNKNOWN  # (ContextVar, key, Context), or None: see _where_current_is()


def make_current(context: Any, span: Any) -> None:
    """Make ``span`` the current span in ``context`` (a ``contextvars.Context`` the
    target will run in)."""
    found = _current
    if found is _UNKNOWN:
        found = _where_current_is()
    if found is None:
        context.run(_attach, span)
        return
    var, key, new_context = found
    # What set_span_in_context() and attach() do, run in the target's context, without
    # their five Python calls (a third of what threadbridge adds to a traced call): the
    # current OpenTelemetry context, read from the target's contextvars.Context without
    # entering it, with the span added, made current there.
    current = context.get(var)
    context.run(var.set, new_context({key: span} if current is None else {**current, key: span}))


def _where_current_is() -> tuple[Any, str, Any] | None:
    """Where the API keeps the current context (its ContextVar), the current span's key
    in it, and its Context type; None if this API keeps them elsewhere (another version,
    or a runtime context of the program's own), and then the API's functions are used."""
    global _current
    found = _current
    if found is _UNKNOWN:
        found = None
        try:
            from opentelemetry.context import _RUNTIME_CONTEXT
            from opentelemetry.context.context import Context
            from opentelemetry.trace.propagation import _SPAN_KEY

            var = getattr(_RUNTIME_CONTEXT, "_current_context", None)
            if isinstance(var, contextvars.ContextVar) and isinstance(_SPAN_KEY, str):
                found = (var, _SPAN_KEY, Context)
        except ImportError:
            pass
        _current = found
    return found  # type: ignore[no-any-return]


def _attach(span: Any) -> None:
    trace = _modules[TRACE]
    # The token is never needed: the context is the call's own, and goes with it.
    trace.context_api.attach(trace.set_span_in_context(span))


def carrier(span: Any) -> dict[str, str] | None:
    """The span's context as text (W3C trace context), for a target that runs in
    another process; None if it cannot be put so."""
    trace = _modules[TRACE]
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover - the API has it since 1.0
        return None
    found: dict[str, str] = {}
    propagate.inject(found, context=trace.set_span_in_context(span))
    return found or None


def event(span: Any, data: dict[str, Any]) -> None:
    """A step of the ladder (``Run.fields()``'s data) as an event of the call's span."""
    attributes = {name: data[key] for key, name in _ATTRIBUTES.items() if data.get(key) is not None}
    span.add_event(f"threadbridge.{data['event']}", attributes)


def end(span: Any, stage: str | None, backend: str | None, error: BaseException | None) -> None:
    """The call has settled (its target has stopped, or been given up on): the span
    ends, with the stage the ladder stopped it in (None: it ended by itself), and the
    target's exception if it raised one on its own."""
    if stage is not None:
        attributes = {"threadbridge.stage": stage}
        if backend is not None:
            attributes["threadbridge.backend"] = backend
        span.set_attributes(attributes)
    if error is not None:
        trace = _modules[TRACE]
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


# --- where the target runs -------------------------------------------------------------


def enter(found: dict[str, str]) -> object:
    """Make the caller's span, carried as text, the current one in this thread (a
    worker process's, a Ray task's); what ``leave()`` takes, or None if this
    interpreter has no OpenTelemetry (or the context could not be read)."""
    try:
        from opentelemetry import context, propagate

        return context.attach(propagate.extract(found))
    except Exception:
        return None


def leave(token: object) -> None:
    if token is not None:
        from opentelemetry import context

        try:
            context.detach(token)  # type: ignore[arg-type]
        except Exception:  # pragma: no cover - detach logs and swallows its own errors
            pass
