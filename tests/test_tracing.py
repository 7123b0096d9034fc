"""W3C trace context end to end (api.md §1.3): the gateway continues a client's ``traceparent`` (else starts a
trace) and answers ``X-Trace-ID``; the context travels in the NATS headers of every command, through the runtime
and the approvals service, to the ``traceparent`` of the runtime's agent and LLM calls; the gateway logs one JSON
line per request.

Everything is real: NATS JetStream, PostgreSQL, the services, an HTTP agent and an OpenAI-compatible server.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from langorch_infra import logs
from tests.helpers import Platform, platform_of, register_agent, wait_status
from tests.llm_server import LlmServerState, RunningLlmServer, running_llm_server
from tests.mcp_server import running_mcp
from tests.scripted_agent import AgentFailure, ScriptedAgent, serving

pytestmark = pytest.mark.integration

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
HEX32 = re.compile(r"[0-9a-f]{32}")

DOC: dict[str, Any] = {
    "procedure_id": "traced", "version": "1",
    "workflow_graph": {"start_node": "before", "nodes": {
        "before": {"type": "sequence", "agent": "WEB", "steps": [
            {"step_id": "first", "action": "navigate", "url": "https://example.com"},
            {"step_id": "second", "action": "extract_text", "target": "h1"}], "next_node": "ask"},
        "ask": {"type": "llm_action", "model": "m-small", "prompt": "Summarise the page", "next_node": "review"},
        "review": {"type": "human_approval", "prompt": "Go on?", "on_approve": "after", "on_reject": "done"},
        "after": {"type": "sequence", "agent": "WEB", "steps": [
            {"step_id": "third", "action": "extract_text", "target": "h2"}], "next_node": "done"},
        "done": {"type": "terminate"}}},
}


MCP_DOC: dict[str, Any] = {
    "procedure_id": "traced_mcp", "version": "1",
    "workflow_graph": {"start_node": "use", "nodes": {
        "use": {"type": "sequence", "agent": "TOOLS", "next_node": "done", "steps": [
            {"step_id": "hello", "action": "plain_text", "output_variable": "said"}]},
        "done": {"type": "terminate", "outputs": {"said": "{{said}}"}}}},
}


RETRY_DOC: dict[str, Any] = {
    "procedure_id": "traced_retry", "version": "1",
    "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "agent": "API", "next_node": "done", "steps": [
            {"step_id": "flaky", "action": "flaky", "output_variable": "got"}]},
        "done": {"type": "terminate", "outputs": {"got": "{{got}}"}}}},
}


def new_traceparent(flags: str = "01") -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{flags}", trace_id, span_id


def parts(traceparent: str) -> tuple[str, str, str]:
    m = TRACEPARENT.fullmatch(traceparent)
    assert m is not None, traceparent
    return m.group(1), m.group(2), m.group(3)


@pytest.fixture(scope="module")
async def llm() -> AsyncIterator[RunningLlmServer]:
    async with running_llm_server(LlmServerState()) as server:
        yield server


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str,
                   llm: RunningLlmServer) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime_settings={
            "llm_base_url": llm.base_url(), "llm_models": {"m-small": {}}, "llm_default_model": "m-small"}) as p:
        for doc in (DOC, MCP_DOC, RETRY_DOC):
            r = await p.client.post("/api/procedures", json={"ckp_json": doc})
            assert r.status_code == 201, r.text
        yield p


@pytest.fixture(scope="module")
async def agent(platform: Platform) -> AsyncIterator[ScriptedAgent]:
    scripted = ScriptedAgent({"navigate": lambda b: {"ok": True}, "extract_text": lambda b: "Example"})
    async with serving(scripted) as running:
        await register_agent(platform.client, running, "web")
        yield running


async def start(c: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    r = await c.post("/api/runs", json={"procedure_id": "traced", "procedure_version": "1"}, headers=headers)
    assert r.status_code == 201, r.text
    return r


async def approval_of(c: httpx.AsyncClient, run_id: str) -> str:
    run = await wait_status(c, run_id, ("waiting_approval", "completed", "failed", "canceled"))
    assert run["status"] == "waiting_approval", run
    approval_id = str(run["waiting_on"]["approval_id"])
    for _ in range(600):  # the approvals service opens it
        if (await c.get(f"/api/approvals/{approval_id}")).status_code == 200:
            return approval_id
        await asyncio.sleep(0.05)
    raise AssertionError(f"approval {approval_id} never opened")


def agent_calls(agent: ScriptedAgent, run_id: str) -> dict[str, dict[str, str]]:
    """The headers of the agent calls of ``run_id``, by step id."""
    return {body["step_id"]: headers for body, headers in zip(agent.requests, agent.headers, strict=True)
            if body["run_id"] == run_id}


async def test_client_traceparent_is_continued_and_echoed(platform: Platform) -> None:
    traceparent, trace_id, _ = new_traceparent()
    r = await platform.client.get("/api/health", headers={"traceparent": traceparent})
    assert r.status_code == 200
    assert r.headers["X-Trace-ID"] == trace_id


async def test_without_traceparent_each_request_starts_a_trace(platform: Platform) -> None:
    first = await platform.client.get("/api/health")
    second = await platform.client.get("/api/health")
    assert HEX32.fullmatch(first.headers["X-Trace-ID"])
    assert HEX32.fullmatch(second.headers["X-Trace-ID"])
    assert first.headers["X-Trace-ID"] != second.headers["X-Trace-ID"]
    assert first.headers["X-Trace-ID"] != "0" * 32


@pytest.mark.parametrize("bad", [
    "garbage",
    "00-" + "0" * 32 + "-" + "b" * 16 + "-01",  # all-zero trace id
    "00-" + "a" * 32 + "-" + "0" * 16 + "-01",  # all-zero parent id
    "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # forbidden version
    "00-" + "a" * 31 + "-" + "b" * 16 + "-01",  # short trace id
    "00-" + "A" * 32 + "-" + "b" * 16 + "-01",  # upper-case hex
])
async def test_an_invalid_traceparent_is_ignored(platform: Platform, bad: str) -> None:
    r = await platform.client.get("/api/health", headers={"traceparent": bad, "tracestate": "vendor=x"})
    assert r.status_code == 200
    assert HEX32.fullmatch(r.headers["X-Trace-ID"])
    assert r.headers["X-Trace-ID"] not in bad.lower()


async def test_problem_responses_carry_the_trace_id(platform: Platform) -> None:
    c = platform.client
    traceparent, trace_id, _ = new_traceparent()
    headers = {"traceparent": traceparent}
    missing = await c.get("/api/runs/no-such-run", headers=headers)  # raised by a route
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert missing.headers["X-Trace-ID"] == trace_id
    unmatched = await c.get("/api/no/such/route", headers=headers)  # no route at all
    assert unmatched.status_code == 404
    assert unmatched.headers["X-Trace-ID"] == trace_id
    refused = await c.post("/api/runs", content=b"x=1", headers=headers | {"content-type": "text/plain"})
    assert refused.status_code == 415  # refused by the middleware before any route
    assert refused.headers["X-Trace-ID"] == trace_id
    invalid = await c.post("/api/runs", json={"procedure_id": "traced", "unknown": 1}, headers=headers)
    assert invalid.status_code == 422  # request validation
    assert invalid.headers["X-Trace-ID"] == trace_id
    assert invalid.json()["request_id"] == invalid.headers["X-Request-ID"]


async def test_an_unexpected_error_is_a_problem_with_the_trace_and_request_ids(platform: Platform) -> None:
    async def boom() -> None:
        raise RuntimeError("a bug")

    platform.app.add_api_route("/api/test-tracing-boom", boom)  # a route with a bug, added to the live gateway
    traceparent, trace_id, _ = new_traceparent()
    r = await platform.client.get("/api/test-tracing-boom", headers={"traceparent": traceparent,
                                                                     "X-Request-ID": "req-boom-1"})
    assert r.status_code == 500
    assert r.json()["code"] == "internal_error"
    assert r.json()["request_id"] == r.headers["X-Request-ID"] == "req-boom-1"
    assert r.headers["X-Trace-ID"] == trace_id


async def test_the_clients_trace_reaches_the_agent_and_llm_calls_and_a_decision_continues_its_own(
        platform: Platform, agent: ScriptedAgent, llm: RunningLlmServer) -> None:
    c = platform.client
    traceparent, trace_id, parent_span = new_traceparent()
    r = await start(c, {"traceparent": traceparent, "tracestate": "acme=t61rcWkgMzE"})
    assert r.headers["X-Trace-ID"] == trace_id
    run_id = r.json()["run_id"]
    approval_id = await approval_of(c, run_id)
    # before the approval: every call of the run started by the request carries the client's trace id, with a
    # span id of its own (not the client's, not another call's) and the client's tracestate
    calls = agent_calls(agent, run_id)
    assert set(calls) == {"first", "second"}
    spans = set()
    for headers in calls.values():
        called_trace, span, flags = parts(headers["traceparent"])
        assert (called_trace, flags) == (trace_id, "01")
        assert span != parent_span
        spans.add(span)
        assert headers["tracestate"] == "acme=t61rcWkgMzE"
    assert len(spans) == 2
    [llm_call] = [call for call in llm.state.requests if "Summarise the page" in json.dumps(call["body"])]
    llm_trace, llm_span, _ = parts(llm_call["headers"]["traceparent"])
    assert llm_trace == trace_id
    assert llm_span not in spans | {parent_span}
    # the decision is another request: the run resumed by it (gateway → approvals service → runtime, over NATS)
    # calls the agent in the decision's trace
    decision_parent, decision_trace, _ = new_traceparent()
    d = await c.post(f"/api/approvals/{approval_id}/decision", json={"decision": "approved"},
                     headers={"traceparent": decision_parent})
    assert d.status_code in (200, 202), d.text
    assert d.headers["X-Trace-ID"] == decision_trace
    run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    after_trace, after_span, _ = parts(agent_calls(agent, run_id)["third"]["traceparent"])
    assert after_trace == decision_trace
    assert after_span not in spans


async def test_the_clients_trace_reaches_an_mcp_tool_call(platform: Platform) -> None:
    """Two runs in two traces share the runtime's one MCP session (whose transport task was started by the first
    call): each tool call carries the trace of its own run."""
    c = platform.client
    traces = []
    async with running_mcp() as server:
        r = await c.post("/api/agents", json={"name": "tools", "channel": "tools", "base_url": server.url,
                                              "protocol": "mcp", "capabilities": ["plain_text"]})
        assert r.status_code == 201, r.text  # registered: a dispatch syncs the runtime's registry before it looks
        for state in ("acme=one", "acme=two"):
            traceparent, trace_id, parent_span = new_traceparent()
            traces.append((trace_id, parent_span, state))
            r = await c.post("/api/runs", json={"procedure_id": "traced_mcp", "procedure_version": "1"},
                             headers={"traceparent": traceparent, "tracestate": state})
            assert r.status_code == 201, r.text
            run = await wait_status(c, r.json()["run_id"])
            assert run["status"] == "completed", run["error"]
    calls = [call for call in server.calls if call["tool"] == "plain_text"]
    assert len(calls) == 2
    for call, (trace_id, parent_span, state) in zip(calls, traces, strict=True):
        called_trace, span, _ = parts(call["headers"]["traceparent"])
        assert called_trace == trace_id
        assert span != parent_span
        assert call["headers"]["tracestate"] == state
        assert call["meta"]["traceparent"] == call["headers"]["traceparent"]  # in _meta too, for MCP servers


async def test_a_retried_run_calls_the_agent_in_the_retry_requests_trace(platform: Platform) -> None:
    c = platform.client
    tries = []

    def flaky(body: dict[str, Any]) -> Any:
        tries.append(body["attempt"])
        if len(tries) == 1:
            raise AgentFailure("not yet", "flaky")
        return "ok"

    async with serving(ScriptedAgent({"flaky": flaky})) as api:
        await register_agent(c, api, "api", name="flaky")
        start_parent, start_trace, _ = new_traceparent()
        r = await c.post("/api/runs", json={"procedure_id": "traced_retry", "procedure_version": "1"},
                         headers={"traceparent": start_parent})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        assert (await wait_status(c, run_id))["status"] == "failed"
        retry_parent, retry_trace, retry_span = new_traceparent()
        retried = await c.post(f"/api/runs/{run_id}/retry", json={}, headers={"traceparent": retry_parent})
        assert retried.status_code == 200, retried.text
        assert retried.headers["X-Trace-ID"] == retry_trace
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    first, second = (parts(h["traceparent"]) for h in api.headers)
    assert first[0] == start_trace
    assert second[0] == retry_trace
    assert second[1] != retry_span


async def test_an_invalid_traceparent_on_a_run_start_gives_the_run_a_new_trace(
        platform: Platform, agent: ScriptedAgent) -> None:
    c = platform.client
    bogus = "00-" + "0" * 32 + "-" + "b" * 16 + "-01"
    r = await start(c, {"traceparent": bogus})
    run_id, trace_id = r.json()["run_id"], r.headers["X-Trace-ID"]
    assert HEX32.fullmatch(trace_id)
    assert trace_id != "0" * 32
    await approval_of(c, run_id)
    calls = agent_calls(agent, run_id)
    assert calls
    assert {parts(h["traceparent"])[0] for h in calls.values()} == {trace_id}


async def test_without_traceparent_the_run_calls_carry_the_requests_new_trace(
        platform: Platform, agent: ScriptedAgent) -> None:
    c = platform.client
    r = await start(c, {})
    run_id, trace_id = r.json()["run_id"], r.headers["X-Trace-ID"]
    await approval_of(c, run_id)
    calls = agent_calls(agent, run_id)
    assert calls
    assert {parts(h["traceparent"])[0] for h in calls.values()} == {trace_id}
    assert all("tracestate" not in h for h in calls.values())


async def test_the_gateway_logs_one_json_line_per_request(platform: Platform) -> None:
    stream = io.StringIO()
    logger = logging.getLogger("langorch_gateway")
    level, propagate, handlers = logger.level, logger.propagate, logger.handlers[:]
    logger.handlers.clear()  # an earlier in-process `langorch up` (another test module) may have installed one
    logger.addHandler(logs.handler("json", "gateway", stream))  # what `langorch serve gateway` installs
    logger.setLevel(logging.INFO)
    try:
        traceparent, trace_id, _ = new_traceparent()
        r = await platform.client.get("/api/runs/no-such-run",
                                      headers={"traceparent": traceparent, "X-Request-ID": "req-trace-log-1"})
        assert r.status_code == 404
        ok = await platform.client.get("/api/health")
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [line for line in lines if line.get("request_id") == "req-trace-log-1"]
    assert len(mine) == 1, lines
    [line] = mine
    assert line["trace_id"] == trace_id == r.headers["X-Trace-ID"]
    assert line["actor"] == "anonymous"
    assert line["route"] == "/api/runs/{run_id}"
    assert line["status"] == 404
    assert isinstance(line["duration_ms"], int | float)
    assert line["duration_ms"] >= 0
    assert line["logger"] == "langorch_gateway.access"
    [health] = [line for line in lines if line.get("request_id") == ok.headers["X-Request-ID"]]
    assert (health["route"], health["status"], health["trace_id"]) == ("/api/health", 200, ok.headers["X-Trace-ID"])
