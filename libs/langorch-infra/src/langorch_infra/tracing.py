"""W3C trace context across the platform (api.md §1.3), on the OpenTelemetry API and SDK.

* The gateway's request span continues an incoming ``traceparent``/``tracestate`` (else starts a trace);
* :func:`producer_span` puts the context of a ``send`` span into the headers of every command published to
  NATS, and :func:`consumer_span` runs a message handler in a span whose parent is the context of its headers;
* an agent's ``/execute`` and an LLM request run in a :func:`client_span` whose ``traceparent`` they send;
  :func:`outbound_headers` gives any other outbound call (MCP's own requests) one with a span id of its own.

The SDK ``TracerProvider`` is installed once per process. Without OpenTelemetry's exporter settings it has no span
processor: spans get real ids and parents and nothing is exported, and the spans only an exported trace needs
(:func:`span`: publishes, nodes, steps, projections) are not even created. With ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER=otlp`` set, :func:`setup` installs a provider that
exports over OTLP/HTTP in batches (the exporter, the sampler, the batch delays and the resource read their own
``OTEL_*`` variables). A provider the embedding application set itself is kept.

One process may host several services (``langorch up``): a provider has one resource, so ``service.name`` names
the process (``langorch-<service>`` for one service, ``langorch`` for several, or ``OTEL_SERVICE_NAME``) and every
span carries the service it was made for as ``langorch.service``, and the run as ``langorch.run_id`` when one is
known: the fields :mod:`langorch_infra.logs` binds for log records (``serve_as``, the runtime's run execution).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, Span, SpanKind, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from langorch_infra import logs

TRACER_NAME = "langorch"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SPAN_FIELDS = {"service": "langorch.service", "run_id": "langorch.run_id"}
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_propagator = TraceContextTextMapPropagator()
_configured = False
_exporting = False


class _Level1Ids(RandomIdGenerator):
    """Random ids without claiming the Trace Context Level 2 ``random`` flag: a new trace's flags are ``01``
    (sampled) as Level 1 agents expect; an incoming trace keeps its own flags."""

    def is_trace_id_random(self) -> bool:
        return False


class _LogFields(SpanProcessor):
    """Stamps the service and the run bound for log records where a span starts (``SPAN_FIELDS``) on the span."""

    def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
        bound = logs.current_fields()
        span.set_attributes({attribute: bound[name] for name, attribute in SPAN_FIELDS.items() if name in bound})

    def on_end(self, span: ReadableSpan) -> None:
        return None


def export_wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether OpenTelemetry's own variables ask for OTLP trace export: an OTLP endpoint or
    ``OTEL_TRACES_EXPORTER=otlp``, and neither ``OTEL_TRACES_EXPORTER=none`` nor ``OTEL_SDK_DISABLED=true``."""
    env = os.environ if env is None else env
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return exporter == "otlp" or any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def setup(services: Sequence[str], instance_id: str | None = None) -> bool:
    """Install this process's tracer provider for ``services`` (the first call decides; later ones and
    :func:`configure` keep it): exporting over OTLP/HTTP when :func:`export_wanted`, else as :func:`configure`.
    True when spans are exported."""
    global _configured, _exporting
    if _configured or not export_wanted():
        configure()
        return _exporting
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    default = f"langorch-{services[0]}" if len(services) == 1 else "langorch"
    attributes: dict[str, str] = {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or default}
    if instance_id is not None:
        attributes[SERVICE_INSTANCE_ID] = instance_id
    provider = TracerProvider(id_generator=_Level1Ids(), resource=Resource.create(attributes))
    provider.add_span_processor(_LogFields())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
        _exporting = True
    _configured = True
    return _exporting


def shutdown() -> None:
    """Export what is still queued (a process that ends with ``os._exit`` skips the SDK's own exit hook)."""
    provider = trace.get_tracer_provider()
    if _exporting and isinstance(provider, TracerProvider):
        provider.shutdown()


def exporting() -> bool:
    return _exporting


def configure() -> None:
    """Install the SDK tracer provider, without span processors, unless one is set (idempotent)."""
    global _configured
    if _configured:
        return
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(TracerProvider(id_generator=_Level1Ids()))
    _configured = True


_tracer: tuple[trace.TracerProvider, trace.Tracer] | None = None


def tracer() -> trace.Tracer:
    """LangOrch's tracer from the installed provider, made once per provider: ``trace.get_tracer`` builds a new one
    (and sets a warnings filter) at every call, which was a measurable part of every API request."""
    global _tracer
    configure()
    provider = trace.get_tracer_provider()
    if _tracer is None or _tracer[0] is not provider:
        _tracer = (provider, provider.get_tracer(TRACER_NAME))
    return _tracer[1]


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
    """The current span of an incoming request (``name`` is ``<method> <path>``): a child of its ``traceparent``,
    else the root of a new trace."""
    with tracer().start_as_current_span(name, context=extract(headers), kind=SpanKind.SERVER,
                                        attributes={"http.request.method": name.split(" ", 1)[0]}) as made:
        yield made


def messaging_attributes(subject: str, operation: str) -> dict[str, str]:
    """Messaging semantic-convention attributes of a NATS ``operation`` (``send``, ``process``) on ``subject``."""
    return {"messaging.system": "nats", "messaging.destination.name": subject, "messaging.operation.type": operation}


@contextlib.contextmanager
def consumer_span(name: str, headers: Mapping[str, str] | None, subject: str | None = None) -> Iterator[Span]:
    """The current span of a bus message handler (``process <name>``): a child of the context in the message
    headers (a command published in a request or in another handler), else the root of a new trace."""
    with tracer().start_as_current_span(f"process {name}", context=extract(headers), kind=SpanKind.CONSUMER,
                                        attributes=messaging_attributes(subject or name, "process")) as span:
        yield span


@contextlib.contextmanager
def span(name: str, *, kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes = None,
         context: otel_context.Context | None = None, links: Sequence[Link] | None = None) -> Iterator[Span]:
    """A current span that only an exported trace needs: made when spans are exported, else nothing is made (the
    current span stays current and is what this yields), so a process that exports nothing pays nothing for it."""
    if not _exporting:
        yield trace.get_current_span()
        return
    with tracer().start_as_current_span(name, context=context, kind=kind, attributes=attributes,
                                        links=links) as made:
        yield made


@contextlib.contextmanager
def producer_span(subject: str, headers: MutableMapping[str, str]) -> Iterator[Span]:
    """``send <subject>`` around a NATS publish, its context put in ``headers`` (the current context when spans are
    not exported)."""
    with span(f"send {subject}", kind=SpanKind.PRODUCER,
              attributes=messaging_attributes(subject, "send")) as made:
        inject(headers)
        yield made


def event_headers(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """The current trace context added to the headers of an event appended to ``LO_EVT`` when spans are exported
    (the projection's span of the event continues that trace); nothing otherwise."""
    return inject(headers) if _exporting else headers


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


@contextlib.contextmanager
def client_span(name: str, attributes: Attributes = None) -> Iterator[Span]:
    """The current span of one outbound call (an agent's ``/execute``, an LLM request): its ``traceparent`` is
    ``inject({})`` inside the block, and the span lasts as long as the call."""
    with tracer().start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as made:
        yield made
