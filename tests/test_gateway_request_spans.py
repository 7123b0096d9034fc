"""A request to the gateway makes one span, its own server span (``tracing.server_span``): FastAPI's automatic
OpenTelemetry instrumentation, which turns itself on whenever a tracer provider is installed (tracing.py installs
the SDK's in every process), is off — it made a second server span and spans for the dependencies, the endpoint
and the serialisation of every request, exported or not. The envelope's headers are on GET and POST answers alike
(a GET is served without starlette's ``BaseHTTPMiddleware``, a POST with one)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind

from langorch_infra import tracing
from tests.helpers import Platform, platform_of

pytestmark = pytest.mark.integration

ENVELOPE = ("X-Request-ID", "X-Trace-ID", "LangOrch-API-Version", "X-LangOrch-Auth")


class Started(SpanProcessor):
    """The spans started while ``on`` (the provider keeps its processors: this one is switched off after)."""

    def __init__(self) -> None:
        self.on = False
        self.spans: list[Span] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.on:
            self.spans.append(span)

    def on_end(self, span: ReadableSpan) -> None:
        return None


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False, agents=False,
                           approvals=False) as p:
        yield p


async def test_a_request_makes_only_the_gateways_server_span(platform: Platform) -> None:
    tracing.configure()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    started = Started()
    provider.add_span_processor(started)
    started.on = True
    try:
        r = await platform.client.get("/api/runs/no-such-run")
    finally:
        started.on = False
    assert r.status_code == 404
    names = [(s.name, s.kind) for s in started.spans]
    assert names == [("GET /api/runs/{run_id}", SpanKind.SERVER)], names
    [span] = started.spans
    assert span.get_span_context().trace_id == int(r.headers["X-Trace-ID"], 16)


async def test_the_envelope_headers_are_on_get_and_post_answers(platform: Platform) -> None:
    c = platform.client
    answers = [await c.get("/api/runs/no-such-run", headers={"X-Request-ID": "req-envelope-get"}),
               await c.get("/api/health"),
               await c.post("/api/runs", json={"procedure_id": "no-such-procedure"},
                            headers={"X-Request-ID": "req-envelope-post"}),
               await c.get("/api/runs/bad%00id")]
    assert [a.status_code for a in answers] == [404, 200, 404, 422]
    for answer in answers:
        assert all(answer.headers.get(name) for name in ENVELOPE), answer.headers
    assert answers[0].headers["X-Request-ID"] == "req-envelope-get"
    assert answers[2].headers["X-Request-ID"] == "req-envelope-post"
    assert answers[3].json()["request_id"] == answers[3].headers["X-Request-ID"]
