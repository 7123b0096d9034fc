"""Traces exported over OTLP/HTTP: ``langorch up`` with OpenTelemetry's standard variables pointing at an OTLP
receiver this test serves (it decodes ``ExportTraceServiceRequest`` with ``opentelemetry-proto``), a real agent
and an OpenAI-compatible LLM server. One run with an agent step, an LLM call and an approval must leave one trace,
rooted at the gateway's ``POST /api/runs``, whose spans cover the command's publishing and handling, the runtime's
node and step, the agent and LLM calls and the projector, each span's parent in the same trace."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from langorch_infra.tracing import export_wanted
from tests.agent_server import running_agent
from tests.helpers import TERMINAL, decide, pending_approval, wait_status, wait_until
from tests.llm_server import running_llm_server
from tests.test_deploy_prometheus import live_stack, work_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class ExportedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    service: str
    attributes: dict[str, Any]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind is not None else None


@dataclass
class Receiver:
    """The spans posted to ``/v1/traces``, decoded."""

    spans: list[ExportedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        got: list[ExportedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                got.extend(ExportedSpan(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.kind,
                                        str(resource.get("service.name")),
                                        {a.key: _value(a.value) for a in s.attributes})
                           for s in scope_spans.spans)
        with self.lock:
            self.spans.extend(got)

    def trace(self, trace_id: str) -> list[ExportedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[tuple[str, Receiver]]:
    """An OTLP/HTTP trace receiver on a free port; yields its base URL and what it received."""
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            received.take(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_export_is_off_without_the_otel_variables() -> None:
    assert not export_wanted({})
    assert not export_wanted({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"})
    assert export_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert export_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert export_wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not export_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert not export_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})


def _procedure(procedure_id: str) -> dict[str, Any]:
    return {"procedure_id": procedure_id, "version": "1", "workflow_graph": {"start_node": "fetch", "nodes": {
        "fetch": {"type": "sequence", "agent": "OTELWEB", "next_node": "ask",
                  "steps": [{"step_id": "get", "action": "extract_text", "output_variable": "text"}]},
        "ask": {"type": "llm_action", "model": "m-priced", "prompt": "Say hello", "next_node": "review"},
        "review": {"type": "human_approval", "prompt": "Go on?", "on_approve": "done", "on_reject": "done"},
        "done": {"type": "terminate"}}}}


def _covered(spans: list[ExportedSpan]) -> list[str]:
    """What the run's trace still lacks."""
    def has(check: Any) -> bool:
        return any(check(s) for s in spans)

    wanted = {
        "gateway POST /api/runs": lambda s: s.name == "POST /api/runs" and s.kind == SpanProto.SPAN_KIND_SERVER,
        "command publish": lambda s: s.name.startswith("send lo.cmd.") and s.kind == SpanProto.SPAN_KIND_PRODUCER
        and s.attributes.get("messaging.system") == "nats",
        "command handling": lambda s: s.name.startswith("process lo.cmd.")
        and s.kind == SpanProto.SPAN_KIND_CONSUMER,
        "runtime node": lambda s: s.name == "node fetch" and s.attributes.get("langorch.service") == "runtime",
        "runtime step": lambda s: s.name == "step get" and s.attributes.get("langorch.action") == "extract_text",
        "agent call": lambda s: s.kind == SpanProto.SPAN_KIND_CLIENT and s.attributes.get("langorch.action")
        == "extract_text" and s.attributes.get("http.response.status_code") == 200,
        "LLM call": lambda s: s.name == "chat m-priced" and s.attributes.get("gen_ai.request.model") == "m-priced"
        and isinstance(s.attributes.get("gen_ai.usage.input_tokens"), int),
        "projection": lambda s: s.name.startswith("project lo.evt.run.")
        and s.attributes.get("db.system") == "postgresql" and s.attributes.get("langorch.service") == "gateway",
    }
    return [what for what, check in wanted.items() if not has(check)]


def _orphans(spans: list[Any]) -> list[tuple[str, str]]:
    """Spans whose parent is not among the trace's spans received."""
    ids = {s.span_id for s in spans}
    return [(s.name, s.parent_id) for s in spans if s.parent_id and s.parent_id not in ids]


@pytest.mark.timeout(600)  # an installation started by `langorch up` on a loaded machine
async def test_one_run_leaves_one_connected_trace(nats_url: str, database_url: str, work_dir: Path,  # noqa: F811
                                                  receiver: tuple[str, Receiver],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, received = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)  # `langorch up` gets this process's environment
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    procedure_id = f"otel_{uuid.uuid4().hex[:8]}"
    async with (running_llm_server() as llm, running_agent() as agent,
                live_stack(work_dir, nats_url, database_url, llm.base_url()) as base,
                httpx.AsyncClient(base_url=base, timeout=60) as c):
        assert (await c.post("/api/procedures", json={"ckp_json": _procedure(procedure_id)})).status_code == 201
        r = await c.post("/api/agents", json={"name": "otel-web", "channel": "otelweb", "base_url": agent.base_url,
                                              "capabilities": ["extract_text"]})
        assert r.status_code == 201, r.text
        r = await c.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": "1"})
        assert r.status_code == 201, r.text
        run_id, trace_id = r.json()["run_id"], r.headers["X-Trace-ID"]
        approval = await pending_approval(c, run_id, timeout=180)
        assert (await decide(c, approval["approval_id"], decision="approve")).status_code in (200, 202)
        assert (await wait_status(c, run_id, TERMINAL, 180))["status"] == "completed"

        # a span is exported when it ends: a parent (the runtime's command) may end after its children are in
        spans = await wait_until(lambda: received.trace(trace_id),
                                 lambda got: not _covered(got) and not _orphans(got), timeout=120, every=0.5)

    roots = [s for s in spans if not s.parent_id]
    assert [(s.name, s.service) for s in roots] == [("POST /api/runs", "langorch-gateway")]
    assert not _orphans(spans), _orphans(spans)
    # the runtime's spans come from the worker process, named `langorch`, the start's decision from the creation
    # worker; every span is marked with its service
    assert {s.service for s in spans} == {"langorch-gateway", "langorch", "langorch-creation"}
    assert {s.attributes.get("langorch.service") for s in spans if s.service == "langorch-creation"} == {"creation"}
    assert {s.attributes.get("langorch.service") for s in spans if s.service == "langorch-gateway"} == {"gateway"}
    assert {"runtime", "approvals"} <= {s.attributes.get("langorch.service") for s in spans}
    assert None not in {s.attributes.get("langorch.service") for s in spans}
    assert all(s.attributes.get("langorch.run_id") == run_id for s in spans if s.name.startswith(("node ", "step ")))
    post = roots[0]
    assert post.attributes["http.route"] == "/api/runs"
    assert post.attributes["http.response.status_code"] == 201
