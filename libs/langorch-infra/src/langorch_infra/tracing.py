"""W3C trace context across the platform (api.md §1.3), on the OpenTelemetry API and SDK.

* The gateway's request span continues an incoming ``traceparent``/``tracestate`` (else starts a trace);
* :func:`inject` puts the current context into the headers of every command published to NATS, and
  :func:`consumer_span` runs a message handler in a span whose parent is the context of its headers;
* :func:`outbound_headers` gives an outbound agent, MCP or LLM call a ``traceparent`` of the current trace with
  a span id of its own.

The SDK ``TracerProvider`` is installed once, without span processors: spans get real ids and parents, nothing
is exported (an exporter is a deployment's choice, out of scope here). A provider the embedding application set
itself is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Span, SpanKind, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "langorch"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_propagator = TraceContextTextMapPropagator()
_configured = False


class _Level1Ids(RandomIdGenerator):
    """Random ids without claiming the Trace Context Level 2 ``random`` flag: a new trace's flags are ``01``
    (sampled) as Level 1 agents expect; an incoming trace keeps its own flags."""

    def is_trace_id_random(self) -> bool:
        return False


def configure() -> None:
    """Install the SDK tracer provider unless one is set (idempotent)."""
    global _configured
    if _configured:
        return
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(TracerProvider(id_generator=_Level1Ids()))
    _configured = True


def tracer() -> trace.Tracer:
    configure()
    return trace.get_tracer(TRACER_NAME)


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context of ``traceparent``/``tracestate`` in ``carrier`` (header names in any case); an empty context
    (a new trace) when they are missing or invalid."""
    if not carrier:
        return otel_context.Context()
    lowered = {k.lower(): v for k, v in carrier.items() if k.lower() in (TRACEPARENT, TRACESTATE)}
    return _propagator.extract(lowered, context=otel_context.Context())


def inject(headers: MutableMapping[str, str], ctx: otel_context.Context | None = None) -> MutableMapping[str, str]:
    """Add ``traceparent`` (and ``tracestate`` when there is one) of ``ctx`` (default: the current context) to
    ``headers``; nothing when no span is current."""
    _propagator.inject(headers, context=ctx)
    return headers


def trace_id_of(span: Span) -> str | None:
    """The 32-hex trace id of ``span``; None for an invalid span."""
    sc = span.get_span_context()
    return format_trace_id(sc.trace_id) if sc.is_valid else None


def current_trace_id() -> str | None:
    return trace_id_of(trace.get_current_span())


@contextlib.contextmanager
def server_span(name: str, headers: Mapping[str, str]) -> Iterator[Span]:
    """The current span of an incoming request: a child of its ``traceparent``, else the root of a new trace."""
    with tracer().start_as_current_span(name, context=extract(headers), kind=SpanKind.SERVER) as span:
        yield span


@contextlib.contextmanager
def consumer_span(name: str, headers: Mapping[str, str] | None) -> Iterator[Span]:
    """The current span of a bus message handler: a child of the context in the message headers (a command
    published in a request or in another handler), else the root of a new trace."""
    with tracer().start_as_current_span(name, context=extract(headers), kind=SpanKind.CONSUMER) as span:
        yield span


def outbound_headers(name: str) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) for one outbound call: a client span, child of the current span, so
    the callee sees the current trace id with a span id of its own (a new trace when nothing is current)."""
    span = tracer().start_span(name, kind=SpanKind.CLIENT)
    try:
        headers: dict[str, str] = {}
        inject(headers, trace.set_span_in_context(span))
        return headers
    finally:
        span.end()


def outbound_traceparent(name: str) -> str:
    return outbound_headers(name)[TRACEPARENT]
