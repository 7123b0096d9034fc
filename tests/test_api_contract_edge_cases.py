"""Edge cases of the gateway REST API and the approvals service against api.md (§1, §4–§9, §13.2).

Written by an outside checker: each test covers what the per-area contract tests (tests/test_*_api.py,
tests/test_approvals_*.py) do not — bad query values on every list (a 422 naming ``query.<param>``, never a
500), the problem+json envelope of every error kind, and the status codes the spec lists but nothing checked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ckp_core.events import ANONYMOUS, WorkflowDelegated, make_event
from ckp_core.ids import new_id
from langorch_infra.callbacks import callback_key, make_token
from langorch_infra.settings import GatewaySettings
from tests.helpers import TERMINAL, Platform, imported, platform_of, register_agent, start_run, wait_status, wait_until
from tests.scripted_agent import ScriptedAgent, serving
from tests.test_async_workflow_runs import hybrid_agent, register_hybrid

pytestmark = pytest.mark.integration

PROBLEM_MEMBERS = ("type", "title", "status", "detail", "instance", "code", "request_id", "retryable")


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        yield p


def simple(pid: str, version: str = "1") -> dict[str, Any]:
    """Completes for ``n >= 0``, fails (terminate ``failed``) for ``n < 0``."""
    return {"procedure_id": pid, "version": version,
            "variables_schema": {"n": {"type": "number", "required": True, "validation": {"max": 100}}},
            "workflow_graph": {"start_node": "check", "nodes": {
                "check": {"type": "logic", "rules": [{"condition": "n < 0", "next_node": "bad"}],
                          "default_next_node": "done"},
                "bad": {"type": "terminate", "status": "failed", "outputs": {"why": "negative"}},
                "done": {"type": "terminate", "outputs": {"n": "{{n}}"}}}}}








def problem(r: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    """Assert a complete RFC 9457 body of ``code`` (and, for a 422, an error at ``field``)."""
    assert r.status_code == status, (r.request.url, r.text)
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body: dict[str, Any] = r.json()
    for member in PROBLEM_MEMBERS:
        assert member in body, (member, body)
    assert body["code"] == code, body
    assert body["type"] == f"urn:langorch:problem:{code}"
    assert body["status"] == status
    assert body["instance"] == r.request.url.path
    assert body["request_id"] == r.headers["x-request-id"]
    if status == 422:
        assert isinstance(body["errors"], dict), body
    if field is not None:
        assert field in body["errors"], body
    return body


# -- §1.4 bad query values on every list: 422 naming the parameter ---------------------------------------------

BAD_QUERIES: list[tuple[str, str, str]] = [
    ("/api/runs", "limit=0", "query.limit"),
    ("/api/runs", "limit=501", "query.limit"),
    ("/api/runs", "offset=-1", "query.offset"),
    ("/api/runs", "limit=abc", "query.limit"),
    ("/api/runs", "status=bogus", "query.status"),
    ("/api/runs", "trigger_type=cron", "query.trigger_type"),
    ("/api/runs", "top_level=maybe", "query.top_level"),
    ("/api/runs", "created_from=2025-01-01T00:00:00", "query.created_from"),
    ("/api/runs", "created_to=yesterday", "query.created_to"),
    ("/api/runs", "created_from=0001-01-01T00:00:00%2B01:00", "query.created_from"),
    ("/api/runs", "created_to=9999-12-31T23:59:59-01:00", "query.created_to"),
    ("/api/runs", "sort=name", "query.sort"),
    ("/api/runs", "order=up", "query.order"),
    ("/api/procedures", "status=bogus", "query.status"),
    ("/api/procedures", "release_channel=staging", "query.release_channel"),
    ("/api/procedures", "latest_only=maybe", "query.latest_only"),
    ("/api/procedures", "sort=version", "query.sort"),
    ("/api/procedures", "limit=0", "query.limit"),
    ("/api/approvals", "status=bogus", "query.status"),
    ("/api/approvals", "sort=decided_at", "query.sort"),
    ("/api/approvals", "created_from=2025-01-01", "query.created_from"),
    ("/api/approvals", "expires_before=0001-01-01T00:00:00%2B01:00", "query.expires_before"),
    ("/api/approvals", "created_to=9999-12-31T23:59:59-01:00", "query.created_to"),
    ("/api/approvals", "limit=501", "query.limit"),
    ("/api/agents", "status=busy", "query.status"),
    ("/api/agents", "protocol=grpc", "query.protocol"),
    ("/api/agents", "sort=name", "query.sort"),
    ("/api/agents", "limit=0", "query.limit"),
    ("/api/agents/pools", "offset=-5", "query.offset"),
    ("/api/leases", "limit=0", "query.limit"),
    ("/api/leases", "offset=x", "query.offset"),
    ("/api/projects", "sort=procedure_count", "query.sort"),
    ("/api/projects", "limit=1000", "query.limit"),
    ("/api/metrics/summary", "window_hours=0", "query.window_hours"),
    ("/api/metrics/summary", "window_hours=721", "query.window_hours"),
    ("/api/metrics/summary", "window_hours=day", "query.window_hours"),
]


async def test_bad_query_values_are_422_naming_the_parameter(platform: Platform) -> None:
    c = platform.client
    for path, query, field in BAD_QUERIES:
        problem(await c.get(f"{path}?{query}"), 422, "validation_failed", field)


async def test_run_sub_lists_validate_their_queries(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_sub"))
    run_id = await start_run(c, "audit_sub", {"n": 1})
    await wait_status(c, run_id)
    for sub, query, field in [("children", "status=bogus", "query.status"),
                              ("children", "limit=0", "query.limit"),
                              ("events", "limit=0", "query.limit"),
                              ("events", "offset=-1", "query.offset"),
                              ("artifacts", "limit=501", "query.limit"),
                              ("checkpoints", "limit=0", "query.limit")]:
        problem(await c.get(f"/api/runs/{run_id}/{sub}?{query}"), 422, "validation_failed", field)
    # a status filter names statuses the spec knows, its cancelled alias included
    r = await c.get(f"/api/runs/{run_id}/children?status=completed,cancelled")
    assert r.status_code == 200, r.text
    assert r.json() == {"items": [], "total": 0, "limit": 100, "offset": 0}
    # an offset past the total: no items, the real total
    r = await c.get(f"/api/runs/{run_id}/events?offset=1000")
    assert r.status_code == 200
    body = r.json()
    assert body["items"] == []
    assert body["total"] > 0
    assert body["offset"] == 1000
    # the read-your-writes header is a stream sequence
    problem(await c.get(f"/api/runs/{run_id}", headers={"X-LangOrch-Min-Position": "abc"}), 422,
            "validation_failed")


async def test_unknown_resources_are_404_not_found(platform: Platform) -> None:
    c = platform.client
    missing = "0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10"
    for path in [f"/api/runs/{missing}", f"/api/runs/{missing}/events", f"/api/runs/{missing}/children",
                 f"/api/runs/{missing}/artifacts", f"/api/runs/{missing}/artifacts/{missing}",
                 f"/api/runs/{missing}/diagnostics", f"/api/runs/{missing}/checkpoints",
                 f"/api/runs/{missing}/checkpoints/{missing}", f"/api/runs/{missing}/graph",
                 f"/api/approvals/{missing}", "/api/agents/nobody", f"/api/leases/{missing}",
                 f"/api/projects/{missing}", "/api/procedures/nothing_here",
                 "/api/procedures/nothing_here/versions", "/api/procedures/nothing_here/deployments",
                 "/api/procedures/nothing_here/1"]:
        body = problem(await c.get(path), 404, "not_found")
        assert body["resource"], body
    for method, path, payload in [("POST", f"/api/runs/{missing}/cancel", {}),
                                  ("POST", f"/api/runs/{missing}/retry", {}),
                                  ("POST", f"/api/runs/{missing}/rerun", {}),
                                  ("DELETE", f"/api/runs/{missing}", None),
                                  ("POST", f"/api/approvals/{missing}/decision", {"decision": "approved"}),
                                  ("DELETE", f"/api/leases/{missing}", None),
                                  ("DELETE", "/api/agents/nobody", None), ("PATCH", "/api/agents/nobody", {}),
                                  ("POST", "/api/agents/nobody/token", None),
                                  ("POST", "/api/agents/nobody/sync-capabilities", None),
                                  ("POST", "/api/agents/heartbeat", {"agent_id": "nobody"}),
                                  ("PATCH", f"/api/projects/{missing}", {"name": "x"}),
                                  ("GET", f"/api/projects/{missing}/cost-summary", None),
                                  ("PATCH", "/api/procedures/nothing_here/1/status", {"status": "active"}),
                                  ("POST", "/api/procedures/nothing_here/1/promote", {"target_channel": "qa"}),
                                  ("POST", "/api/procedures/nothing_here/1/rollback", {"target_channel": "qa"}),
                                  ("DELETE", "/api/procedures/nothing_here/1", None),
                                  ("DELETE", f"/api/projects/{missing}", None)]:
        problem(await c.request(method, path, json=payload), 404, "not_found")


async def test_problem_envelope_of_transport_errors(platform: Platform) -> None:
    c = platform.client
    problem(await c.patch("/api/runs"), 405, "method_not_allowed")
    problem(await c.post("/api/runs", content=b"{not json", headers={"content-type": "application/json"}), 400,
            "malformed_json")
    problem(await c.post("/api/runs", content=b"procedure_id=x", headers={"content-type": "text/plain"}), 415,
            "unsupported_media_type")
    problem(await c.post("/api/runs", json={"procedure_id": "x", "colour": "red"}), 422, "unknown_field",
            "colour")
    problem(await c.post("/api/runs", json={"procedure_id": "x", "case_id": "c-1"}), 422, "unsupported_field",
            "case_id")
    problem(await c.post("/api/runs", json={"procedure_id": "x", "case_id": None}), 404, "not_found")
    r = await c.get("/api/health")
    assert r.headers["LangOrch-API-Version"] == "1"


# -- §5.3 runs -------------------------------------------------------------------------------------------------


async def test_run_create_names_an_unknown_project(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_proj"))
    body = problem(await c.post("/api/runs", json={"procedure_id": "audit_proj", "procedure_version": "1",
                                                   "input_vars": {"n": 1}, "project_id": "no_such_project"}),
                   404, "not_found")
    assert body["resource"] == "project"


async def test_retry_of_an_archived_version_is_procedure_version_unavailable(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_archived"))
    run_id = await start_run(c, "audit_archived", {"n": -1})
    assert (await wait_status(c, run_id))["status"] == "failed"
    r = await c.patch("/api/procedures/audit_archived/1/status", json={"status": "archived"})
    assert r.status_code == 200, r.text
    body = problem(await c.post(f"/api/runs/{run_id}/retry", json={}), 409, "procedure_version_unavailable")
    assert body["retryable"] is False
    run = (await c.get(f"/api/runs/{run_id}")).json()
    assert run["status"] == "failed"
    assert run["retry_count"] == 0


async def test_run_state_conflicts_carry_current_status_and_allowed(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_conflict"))
    run_id = await start_run(c, "audit_conflict", {"n": 1})
    assert (await wait_status(c, run_id))["status"] == "completed"
    for method, path in [("POST", f"/api/runs/{run_id}/cancel"), ("POST", f"/api/runs/{run_id}/retry")]:
        body = problem(await c.request(method, path, json={}), 409, "invalid_run_transition")
        assert body["current_status"] == "completed"
        assert sorted(body["allowed"]) == ["delete", "rerun"]
    # rerun with inputs that fail validation: every failure under input_vars.
    body = problem(await c.post(f"/api/runs/{run_id}/rerun", json={"input_vars": {"n": 500}}), 422,
                   "invalid_input_vars", "input_vars.n")
    # rerun of a version that does not exist
    problem(await c.post(f"/api/runs/{run_id}/rerun", json={"procedure_version": "9"}), 404, "not_found")


async def test_cleanup_validates_its_body(platform: Platform) -> None:
    c = platform.client
    for payload, field in [({}, "before"), ({"before": "2025-01-01"}, "before"),
                           ({"before": "2025-01-01T00:00:00Z", "statuses": ["running"]}, "statuses"),
                           ({"before": "2025-01-01T00:00:00Z", "limit": 0}, "limit"),
                           ({"before": "2025-01-01T00:00:00Z", "limit": 10_001}, "limit"),
                           ({"before": "0001-01-01T00:00:00+01:00"}, "before")]:
        problem(await c.post("/api/runs/cleanup", json=payload), 422, "validation_failed", field)
    problem(await c.post("/api/runs/cleanup", json={"before": "2025-01-01T00:00:00Z", "everything": True}), 422,
            "unknown_field", "everything")
    r = await c.post("/api/runs/cleanup", json={"before": "2000-01-01T00:00:00+02:00"})
    assert r.status_code == 200, r.text
    assert r.json() == {"dry_run": True, "matched": 0, "sample_run_ids": [], "before": "1999-12-31T22:00:00.000000Z",
                        "statuses": ["completed", "failed", "canceled"]}
    problem(await c.delete("/api/runs/cleanup/history?before=not-a-time"), 422, "validation_failed",
            "query.before")
    problem(await c.delete("/api/runs/cleanup/history"), 422, "validation_failed", "query.before")


async def test_checkpoint_detail_bounds(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_cp"))
    run_id = await start_run(c, "audit_cp", {"n": 2})
    await wait_status(c, run_id)
    page = (await c.get(f"/api/runs/{run_id}/checkpoints")).json()
    assert page["total"] >= 1
    cp = page["items"][0]["checkpoint_id"]
    for bad in ("0", "1048577", "many"):
        problem(await c.get(f"/api/runs/{run_id}/checkpoints/{cp}?max_value_bytes={bad}"), 422,
                "validation_failed", "query.max_value_bytes")
    problem(await c.get(f"/api/runs/{run_id}/checkpoints/{cp}?checkpoint_ns=elsewhere"), 404, "not_found")


# -- §5.7 / §6.5 stream limits ---------------------------------------------------------------------------------


async def test_streams_per_principal_are_limited(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           gateway_settings={"sse_max_per_principal": 2}) as p:
        c = p.client
        async with c.stream("GET", "/api/approvals/stream") as first:
            assert first.status_code == 200
            async with c.stream("GET", "/api/approvals/stream?status=pending") as second:
                assert second.status_code == 200
                for path in ("/api/approvals/stream", "/api/runs/0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10/stream"):
                    r = await c.get(path)
                    if path.startswith("/api/approvals"):
                        body = problem(r, 429, "too_many_streams")
                        assert body["retryable"] is True
                        assert int(r.headers["Retry-After"]) >= 1
                    else:  # an unknown run is still a 404, limit or not
                        problem(r, 404, "not_found")
        # both closed: the slots come back once the gateway has seen the disconnects
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with c.stream("GET", "/api/approvals/stream") as again, \
                    c.stream("GET", "/api/approvals/stream") as and_again:
                if again.status_code == 200 and and_again.status_code == 200:
                    break
            assert asyncio.get_running_loop().time() < deadline, "stream slots were not released"
            await asyncio.sleep(0.1)


async def test_default_run_channel_setting_picks_the_channel(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           gateway_settings={"default_run_channel": "dev"}) as p:
        c = p.client
        await imported(c, simple("audit_chan", "1"))
        await imported(c, simple("audit_chan", "2"))
        r = await c.post("/api/procedures/audit_chan/2/promote", json={"target_channel": "prod"})
        assert r.status_code == 200, r.text
        # prod has an active version, dev none: the setting names dev, so nothing is runnable
        body = problem(await c.post("/api/runs", json={"procedure_id": "audit_chan", "input_vars": {"n": 1}}), 409,
                       "no_runnable_version")
        assert "procedure_version" in body["detail"]
        r = await c.patch("/api/procedures/audit_chan/1/status", json={"status": "active"})
        assert r.status_code == 200, r.text
        r = await c.post("/api/runs", json={"procedure_id": "audit_chan", "input_vars": {"n": 1}})
        assert r.status_code == 201, r.text
        assert (r.json()["procedure_version"], r.json()["release_channel"]) == ("1", "dev")
        # an explicit channel still wins over the setting
        r = await c.post("/api/runs", json={"procedure_id": "audit_chan", "release_channel": "prod",
                                            "input_vars": {"n": 1}})
        assert r.status_code == 201, r.text
        assert (r.json()["procedure_version"], r.json()["release_channel"]) == ("2", "prod")
        # a channel picks a version only when none is named: both together is ambiguous
        for version in ("1", "latest"):
            problem(await c.post("/api/runs", json={"procedure_id": "audit_chan", "procedure_version": version,
                                                    "release_channel": "prod", "input_vars": {"n": 1}}),
                    422, "validation_failed", "release_channel")


async def test_stream_positions_in_headers_are_validated(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_hdr"))
    run_id = await start_run(c, "audit_hdr", {"n": 1})
    await wait_status(c, run_id)
    for value in ("\u00b2", "1" * 30, "-1", "abc"):
        raw = value.encode("latin-1")
        problem(await c.get(f"/api/runs/{run_id}/stream", headers={"Last-Event-ID": raw}), 422, "validation_failed",
                "header.Last-Event-ID")
        problem(await c.get("/api/approvals/stream", headers={"Last-Event-ID": raw}), 422, "validation_failed",
                "header.Last-Event-ID")
        problem(await c.get(f"/api/runs/{run_id}", headers={"X-LangOrch-Min-Position": raw}), 422,
                "validation_failed", "header.X-LangOrch-Min-Position")
        problem(await c.get("/api/runs", headers={"X-LangOrch-Min-Position": raw}), 422, "validation_failed",
                "header.X-LangOrch-Min-Position")
    for value in ("\u00b2", "abc"):
        r = await c.delete("/api/procedures/audit_hdr/1", headers={"If-Match": f'"{value}"'.encode("latin-1")})
        problem(r, 412, "precondition_failed")


async def test_chunked_bodies_get_the_same_type_and_size_checks(platform: Platform) -> None:
    c = platform.client

    async def chunks(data: bytes, size: int = 65_536) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i:i + size]

    # no Content-Length (Transfer-Encoding: chunked): a body of another type is still 415 ...
    r = await c.post("/api/projects", content=chunks(b"name=x"), headers={"content-type": "text/plain"})
    problem(r, 415, "unsupported_media_type")
    # ... and a body over 1 MiB still 413
    big = b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    r = await c.post("/api/projects", content=chunks(big), headers={"content-type": "application/json"})
    problem(r, 413, "payload_too_large")
    # a small chunked JSON body is served as usual
    r = await c.post("/api/projects", content=chunks(b'{"name": "audit chunked"}'),
                     headers={"content-type": "application/json"})
    assert r.status_code in (201, 409), r.text


async def test_agent_callbacks_take_bodies_up_to_10_mib(platform: Platform) -> None:
    c = platform.client
    output = {"blob": "x" * (3 * 1024 * 1024)}
    missing = "0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10"
    # 3 MiB is within the callback limit: the answer is about the (missing) token, not the size
    problem(await c.post(f"/api/runs/{missing}/callback", json={"output": output}), 403, "invalid_callback_token")
    problem(await c.post(f"/api/runs/{missing}/callback", content=b" " * (10 * 1024 * 1024 + 1),
                         headers={"content-type": "application/json"}), 413, "payload_too_large")
    # elsewhere the limit stays 1 MiB
    problem(await c.post(f"/api/runs/{missing}/cancel", json={"reason": "x" * (2 * 1024 * 1024)}), 413,
            "payload_too_large")


async def test_stored_artifacts_carry_the_sha256_of_their_content(platform: Platform) -> None:
    content = b"audited artifact bytes"
    doc = {"procedure_id": "audit_art", "version": "1", "workflow_graph": {"start_node": "make", "nodes": {
        "make": {"type": "sequence", "agent": "AUDITART", "next_node": "done", "steps": [
            {"step_id": "produce", "action": "produce", "output_variable": "made"}]},
        "done": {"type": "terminate"}}}}

    def produce(body: dict[str, Any]) -> dict[str, Any]:
        return {"artifact": {"kind": "file", "name": "a.txt", "mime_type": "text/plain",
                             "content_base64": base64.b64encode(content).decode()},
                "artifact_uri": "https://example.com/a.pdf", "artifact_kind": "link"}

    c = platform.client
    agent = ScriptedAgent({"produce": produce})
    async with serving(agent):
        await register_agent(c, agent, "auditart")
        await imported(c, doc)
        run_id = await start_run(c, "audit_art")
        assert (await wait_status(c, run_id))["status"] == "completed"
    page = (await c.get(f"/api/runs/{run_id}/artifacts")).json()
    by_kind = {a["kind"]: a for a in page["items"]}
    assert by_kind["file"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert by_kind["link"]["sha256"] is None  # a link's content is not known
    detail = (await c.get(f"/api/runs/{run_id}/artifacts/{by_kind['file']['artifact_id']}")).json()
    assert detail == by_kind["file"]
    url = detail["download_url"]
    # Range headers the server does not take are ignored (RFC 9110 §14.2); only one outside the content is 416
    for ignored in ("bytes=0-1,3-4", "items=0-1", "bytes=abc"):
        r = await c.get(url, headers={"Range": ignored})
        assert (r.status_code, r.content) == (200, content), ignored
    problem(await c.get(url, headers={"Range": f"bytes={len(content)}-"}), 416, "range_not_satisfiable")
    r = await c.get(url, headers={"Range": "bytes=0-6"})
    assert (r.status_code, r.content) == (206, content[:7])


async def test_run_events_honour_min_position(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_ryw"))
    r = await c.post("/api/runs", json={"procedure_id": "audit_ryw", "procedure_version": "1", "input_vars": {"n": 1}})
    assert r.status_code == 201, r.text
    run_id, position = r.json()["run_id"], int(r.headers["X-LangOrch-Position"])
    events = await c.get(f"/api/runs/{run_id}/events", headers={"X-LangOrch-Min-Position": str(position)})
    assert events.status_code == 200, events.text
    assert int(events.headers["X-LangOrch-Position"]) >= position
    assert "X-LangOrch-Consistency" not in events.headers
    assert events.json()["items"][0]["event_type"] == "run_created"
    problem(await c.get(f"/api/runs/{run_id}/events", headers={"X-LangOrch-Min-Position": "later"}), 422,
            "validation_failed", "header.X-LangOrch-Min-Position")


async def test_an_empty_multi_value_filter_is_no_filter(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_empty"))
    run_id = await start_run(c, "audit_empty", {"n": 1})
    await wait_status(c, run_id)
    for path, query in [("/api/runs", "status="), ("/api/runs", "trigger_type=%20,"), ("/api/runs", "procedure_id="),
                        ("/api/runs", "created_by=&project_id="), ("/api/approvals", "run_id="),
                        ("/api/leases", "run_id="), ("/api/agents", "pool_id="),
                        ("/api/procedures", "status="), ("/api/procedures", "release_channel="),
                        ("/api/approvals", "status="), (f"/api/runs/{run_id}/events", "event_type="),
                        (f"/api/runs/{run_id}/events", "event_type=,"), (f"/api/runs/{run_id}/events", "node_id=")]:
        unfiltered = (await c.get(path)).json()
        r = await c.get(f"{path}?{query}")
        assert r.status_code == 200, (path, query, r.text)
        assert r.json()["total"] == unfiltered["total"], (path, query)


async def test_every_failing_query_parameter_is_reported(platform: Platform) -> None:
    c = platform.client
    for path, query, fields in [
        ("/api/runs", "status=bogus&trigger_type=cron&created_from=x&created_to=2025-01-01",
         {"query.status", "query.trigger_type", "query.created_from", "query.created_to"}),
        ("/api/approvals", "status=bogus&created_from=x&expires_before=y",
         {"query.status", "query.created_from", "query.expires_before"}),
        ("/api/procedures", "status=bogus&release_channel=staging", {"query.status", "query.release_channel"}),
    ]:
        body = problem(await c.get(f"{path}?{query}"), 422, "validation_failed")
        assert set(body["errors"]) == fields, body
    body = problem(await c.post("/api/runs/cleanup", json={"before": "soon", "statuses": ["running"]}), 422,
                   "validation_failed")
    assert set(body["errors"]) == {"before", "statuses"}


async def test_a_callback_after_its_delegation_timed_out_is_not_resumed(nats_url: str, database_url: str) -> None:
    doc = {"procedure_id": "audit_cb_timeout", "version": "1", "global_config": {"on_failure": "gate"},
           "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "agent": "HYBRID", "next_node": "end", "steps": [
            {"step_id": "slow", "action": "run_full_salesforce_login", "workflow_dispatch_mode": "async"}]},
        "gate": {"type": "human_approval", "on_approve": "end", "on_reject": "end"},
        "end": {"type": "terminate"}}}}
    async with platform_of(nats_url, database_url, runtime_settings={"callback_timeout_s": 1}) as p:
        c = p.client
        async with serving(hybrid_agent()) as agent:
            await register_hybrid(c, agent)
            await imported(c, doc)
            run_id = await start_run(c, "audit_cb_timeout")
            run = await wait_status(c, run_id, ("waiting_approval", *TERMINAL))
            assert run["status"] == "waiting_approval", run
            token = agent.requests[-1]["callback"]["token"]
            r = await c.post(f"/api/runs/{run_id}/callback", json={"status": "success", "output": {"late": True}},
                             headers={"X-LangOrch-Callback-Token": token})
            assert r.status_code == 200, r.text
            assert r.json() == {"resumed": False, "status": "timed_out"}
            events = (await c.get(f"/api/runs/{run_id}/events?event_type=workflow_callback_received")).json()
            assert events["total"] == 0


# api.md §1.2's table of statuses and codes, as written there
SPEC_CODES = {
    400: "malformed_json callback_mismatch",
    # invalid_grant: §1.2 lists it under 403, §15.3's endpoint table says 401 (bad or expired grant); the
    # endpoint's own rule is kept (docs/decisions.md)
    401: "unauthenticated invalid_token token_expired invalid_credentials invalid_signature stale_signature "
         "invalid_grant",
    403: "forbidden csrf_failed invalid_callback_token callback_token_expired",
    404: "not_found", 405: "method_not_allowed",
    409: "procedure_version_exists version_not_draft invalid_status_transition invalid_promotion invalid_rollback "
         "procedure_version_active procedure_version_in_use procedure_not_runnable procedure_not_effective "
         "no_runnable_version invalid_run_transition procedure_version_unavailable approval_not_pending "
         "approval_expired run_not_paused duplicate_delivery agent_exists resource_limit_conflict project_exists "
         "secret_exists project_not_empty secret_in_use user_exists last_admin artifact_external "
         "idempotency_key_in_progress",
    412: "precondition_failed", 413: "payload_too_large", 415: "unsupported_media_type", 416: "range_not_satisfiable",
    422: "validation_failed unknown_field unsupported_field compile_failed promotion_validation_failed "
         "invalid_input_vars invalid_decision decided_by_mismatch idempotency_key_reused url_not_allowed "
         "secret_value_not_accepted unsupported_event_source",
    429: "rate_limited too_many_login_attempts max_concurrent_runs too_many_streams",
    500: "internal_error", 502: "upstream_error", 504: "upstream_timeout", 503: "unavailable",
}


def test_every_spec_code_maps_to_its_status_in_one_place() -> None:
    from langorch_gateway.problems import RETRYABLE, STATUS, TITLES

    for status, codes in SPEC_CODES.items():
        for code in codes.split():
            assert STATUS.get(code) == status, (code, STATUS.get(code), status)
            assert code in TITLES, code
            if status in (429, 503):
                assert code in RETRYABLE, code


async def test_a_repeated_callback_is_a_duplicate_not_a_second_resume(nats_url: str, database_url: str) -> None:
    doc = {"procedure_id": "audit_cb_twice", "version": "1", "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "agent": "HYBRID", "next_node": "gate", "steps": [
            {"step_id": "slow", "action": "run_full_salesforce_login", "workflow_dispatch_mode": "async"}]},
        "gate": {"type": "human_approval", "on_approve": "end", "on_reject": "end"},
        "end": {"type": "terminate"}}}}
    async with platform_of(nats_url, database_url, runtime_settings={"callback_timeout_s": 60}) as p:
        c = p.client
        async with serving(hybrid_agent()) as agent:
            await register_hybrid(c, agent)
            await imported(c, doc)
            run_id = await start_run(c, "audit_cb_twice")
            assert (await wait_status(c, run_id, ("paused", *TERMINAL)))["status"] == "paused"
            token = agent.requests[-1]["callback"]["token"]
            headers = {"X-LangOrch-Callback-Token": token}
            first = await c.post(f"/api/runs/{run_id}/callback", json={"output": {"n": 1}}, headers=headers)
            assert first.status_code == 202, first.text
            assert first.json() == {"resumed": True, "status": "queued", "run_id": run_id}
            # the answer came once the run had taken the callback: a repeat is told so at once
            second = await c.post(f"/api/runs/{run_id}/callback", json={"output": {"n": 2}}, headers=headers)
            assert second.status_code == 200, second.text
            assert second.json() == {"resumed": False, "status": "duplicate"}
            await wait_status(c, run_id, ("waiting_approval", *TERMINAL))
            received = (await c.get(f"/api/runs/{run_id}/events?event_type=workflow_callback_received")).json()
            assert received["total"] == 1
            assert received["items"][0]["payload"]["output"] == {"n": 1}


async def test_a_run_retried_while_it_waited_for_a_callback_reads_paused(nats_url: str, database_url: str) -> None:
    doc = {"procedure_id": "audit_cb_retry", "version": "1", "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "agent": "HYBRID", "next_node": "end", "steps": [
            {"step_id": "slow", "action": "run_full_salesforce_login", "workflow_dispatch_mode": "async"}]},
        "end": {"type": "terminate"}}}}
    async with platform_of(nats_url, database_url, runtime_settings={"callback_timeout_s": 60}) as p:
        c = p.client
        async with serving(hybrid_agent()) as agent:
            await register_hybrid(c, agent)
            await imported(c, doc)
            run_id = await start_run(c, "audit_cb_retry")
            assert (await wait_status(c, run_id, ("paused", *TERMINAL)))["status"] == "paused"
            token = agent.requests[-1]["callback"]["token"]
            assert (await c.post(f"/api/runs/{run_id}/cancel", json={})).json()["status"] == "canceled"
            r = await c.post(f"/api/runs/{run_id}/retry", json={})
            assert r.status_code == 200, r.text
            # the retried run waits for the same delegation again: paused, not running (api.md §5.2)
            run = await wait_status(c, run_id, ("paused", "completed", "failed"))
            assert run["status"] == "paused", run
            assert run["waiting_on"]["kind"] == "callback"
            assert run["waiting_on"]["node_id"] == "work"
            r = await c.post(f"/api/runs/{run_id}/callback", json={"output": {"ok": 1}},
                             headers={"X-LangOrch-Callback-Token": token})
            assert r.status_code == 202, r.text
            assert (await wait_status(c, run_id))["status"] == "completed"


async def test_query_datetimes_parse_alike_on_every_list(platform: Platform) -> None:
    c = platform.client
    for path, name in [("/api/runs", "created_from"), ("/api/approvals", "created_from"),
                       ("/api/approvals", "expires_before"), ("/api/audit", "since")]:
        for good in ("2025-01-01T00:00:00Z", "2025-01-01 00:00:00+01:00", "2025-01-01T00:00:00.5-05:00"):
            r = await c.get(path, params={name: good})
            assert r.status_code == 200, (path, good, r.text)
        # an unencoded '+' of the offset arrives as a space
        r = await c.get(f"{path}?{name}=2025-01-01T00:00:00+01:00")
        assert r.status_code == 200, (path, r.text)
        for bad in ("20250101T000000Z", "2025-01-01T00:00Z", "2025-W01-1T00:00:00Z", "2025-01-01"):
            problem(await c.get(path, params={name: bad}), 422, "validation_failed", f"query.{name}")


async def test_diagnostics_count_the_checkpoints_the_run_has(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_diag"))
    run_id = await start_run(c, "audit_diag", {"n": 3})
    await wait_status(c, run_id)
    listed = (await c.get(f"/api/runs/{run_id}/checkpoints")).json()
    assert listed["total"] >= 1
    diag = (await c.get(f"/api/runs/{run_id}/diagnostics")).json()
    assert diag["execution"]["checkpoint_count"] == listed["total"]
    assert diag["execution"]["last_checkpoint_id"] == listed["items"][0]["checkpoint_id"]
    assert diag["execution"]["delivery_count"] == 1


async def test_an_approval_without_context_has_an_empty_context_object(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "audit_bare_gate", "version": "1", "workflow_graph": {"start_node": "g", "nodes": {
        "g": {"type": "human_approval", "on_approve": "e", "on_reject": "e"}, "e": {"type": "terminate"}}}}
    await imported(c, doc)
    run_id = await start_run(c, "audit_bare_gate")
    run = await wait_status(c, run_id, ("waiting_approval", *TERMINAL))
    approval_id = run["waiting_on"]["approval_id"]

    async def approvals_of_run() -> list[dict[str, Any]]:
        return (await c.get("/api/approvals", params={"run_id": run_id})).json().get("items") or []

    # the run reads waiting_approval before the approvals service's row is projected: wait for the row
    [listed] = await wait_until(approvals_of_run)
    detail = (await c.get(f"/api/approvals/{approval_id}")).json()
    for view in (listed, detail):
        assert view["context_data"] == {}
        assert view["options"] == []
    r = await c.post(f"/api/approvals/{approval_id}/decision", json={"decision": "approved"})
    assert r.status_code == 200, r.text
    assert r.json()["context_data"] == {}
    assert r.json()["decided_by"] == "anonymous"


async def test_max_page_size_setting_bounds_every_list(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           gateway_settings={"max_page_size": 5}) as p:
        c = p.client
        for path in ("/api/runs", "/api/procedures", "/api/approvals", "/api/agents", "/api/leases", "/api/projects",
                     "/api/audit"):
            r = await c.get(path, params={"limit": 5})
            assert r.status_code == 200, (path, r.text)
            assert r.json()["limit"] == 5
            problem(await c.get(path, params={"limit": 6}), 422, "validation_failed", "query.limit")
            # without a limit the page is the default (100) or the setting when that is lower
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.json()["limit"] == 5


async def test_non_standard_json_numbers_are_malformed_json(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_nan"))
    json_headers = {"content-type": "application/json"}
    for literal in ("NaN", "Infinity", "-Infinity"):
        body = f'{{"procedure_id": "audit_nan", "procedure_version": "1", "input_vars": {{"n": 1, "x": {literal}}}}}'
        problem(await c.post("/api/runs", content=body.encode(), headers=json_headers), 400, "malformed_json")
        r = await c.post("/api/procedures/validate", content=f'{{"ckp_json": {{"a": {literal}}}}}'.encode(),
                         headers=json_headers)
        problem(r, 400, "malformed_json")
    # the projection still answers (nothing unstorable was appended)
    run_id = await start_run(c, "audit_nan", {"n": 1})
    assert (await wait_status(c, run_id))["status"] == "completed"


async def test_deeply_nested_bodies_are_refused_not_a_500(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_deep"))
    deep = "[" * 100_000 + "]" * 100_000
    body = f'{{"procedure_id": "audit_deep", "procedure_version": "1", "input_vars": {{"n": 1, "x": {deep}}}}}'
    r = await c.post("/api/runs", content=body.encode(), headers={"content-type": "application/json"})
    problem(r, 400, "malformed_json")  # FastAPI's parser gives up (recursion): the body is unusable JSON
    # the same with what the gateway's own body checks look for (a NUL escape, a NaN)
    for extra in ('"\\u0000"', "NaN"):
        body = f'{{"procedure_id": "audit_deep", "input_vars": {{"n": 1, "y": {extra}, "x": {deep}}}}}'
        r = await c.post("/api/runs", content=body.encode(), headers={"content-type": "application/json"})
        problem(r, 400, "malformed_json")


async def test_bodies_nesting_deeper_than_160_levels_are_422(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_nest"))
    for depth, status in ((158, 201), (159, 422), (500, 422)):  # the body object and input_vars are 2 levels
        deep = "[" * depth + "]" * depth
        body = f'{{"procedure_id": "audit_nest", "procedure_version": "1", "input_vars": {{"n": 1, "x": {deep}}}}}'
        r = await c.post("/api/runs", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == status, (depth, r.text)
        if status == 422:
            errors = problem(r, 422, "validation_failed")["errors"]
            [where] = errors
            assert where.startswith("input_vars.x.0.0")
        else:
            assert (await wait_status(c, r.json()["run_id"]))["status"] == "completed"


async def test_lone_surrogates_in_bodies_are_422_at_their_path(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("audit_sur"))
    h = {"content-type": "application/json"}
    r = await c.post("/api/runs", content=b'{"procedure_id": "audit_sur", "procedure_version": "1", '
                     b'"input_vars": {"n": 1, "x": "a\\ud800", "y": ["\\udfff"]}}', headers=h)
    errors = problem(r, 422, "validation_failed")["errors"]
    assert set(errors) == {"input_vars.x", "input_vars.y.0"}
    r = await c.post("/api/runs", content=b'{"procedure_id": "audit_sur", "procedure_version": "1", '
                     b'"input_vars": {"n": 1, "\\ud800k": 1}}', headers=h)
    assert set(problem(r, 422, "validation_failed")["errors"]) == {"input_vars.\\ud800k"}
    # a surrogate pair is one real character and is taken
    r = await c.post("/api/runs", content=b'{"procedure_id": "audit_sur", "procedure_version": "1", '
                     b'"input_vars": {"n": 1, "smile": "\\ud83d\\ude00"}}', headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["input_vars"]["smile"] == "\U0001f600"


async def test_a_callback_faster_than_the_delegation_event_is_accepted(nats_url: str, database_url: str) -> None:
    """An agent may call back before the runtime has appended ``workflow_delegated`` (it answers the dispatch, then
    calls back at once): the gateway waits (bounded) for the delegation instead of refusing the token."""
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           gateway_settings={"command_timeout_s": 1, "ryw_timeout_ms": 2000}) as p:
        c = p.client
        await imported(c, simple("audit_fast_cb"))
        run_id = await start_run(c, "audit_fast_cb", {"n": 1})  # no runtime: the run stays created
        delegation_id = new_id()
        key = callback_key(GatewaySettings().auth_secret_key.get_secret_value())
        token = make_token(key, run_id, "check", "s1", delegation_id, int(time.time()) + 600)
        store = p.app.state.store

        async def delegate_later() -> None:
            await asyncio.sleep(0.5)
            head = await store.head("run", run_id)
            event = make_event(WorkflowDelegated(node_id="check", step_id="s1", delegation_id=delegation_id,
                                                 action="slow"), aggregate_id=run_id, seq=head.seq + 1,
                               actor=ANONYMOUS)
            await store.append([event], expected_position=head.position)

        later = asyncio.create_task(delegate_later())
        r = await c.post(f"/api/runs/{run_id}/callback", json={"output": {"ok": True}},
                         headers={"X-LangOrch-Callback-Token": token})
        await later
        assert r.status_code == 202, r.text
        assert r.json() == {"resumed": True, "status": "queued", "run_id": run_id}
        # a token naming a delegation that never comes is still refused once the wait is over
        other = make_token(key, run_id, "check", "s1", new_id(), int(time.time()) + 600)
        problem(await c.post(f"/api/runs/{run_id}/callback", json={},
                             headers={"X-LangOrch-Callback-Token": other}), 403, "invalid_callback_token")
        # tokens whose numbers are not ASCII digits are malformed, not a 500
        for bad in ("v1.\u00b2.d.s", "v1.1.d"):
            problem(await c.post(f"/api/runs/{run_id}/callback?token={bad}", json={}), 403, "invalid_callback_token")


async def test_a_callback_while_another_branch_still_runs(nats_url: str, database_url: str) -> None:
    """A delegation can be open while the run reads ``running`` (a parallel branch still executes). The gateway waits
    (bounded) for the run to suspend; a run that is still executing then is 409 ``run_not_paused`` (a resume sent
    now would be lost), and the same callback later is taken (api.md §5.10)."""
    doc = {"procedure_id": "audit_cb_par", "version": "1", "workflow_graph": {"start_node": "fan", "nodes": {
        "fan": {"type": "parallel", "next_node": "end", "branches": [
            {"branch_id": "ask", "start_node": "work"}, {"branch_id": "slow", "start_node": "nap"}]},
        "work": {"type": "sequence", "agent": "HYBRID", "next_node": "end", "steps": [
            {"step_id": "s", "action": "run_full_salesforce_login", "workflow_dispatch_mode": "async",
             "output_variable": "got"}]},
        "nap": {"type": "processing", "operations": [{"action": "wait", "duration_ms": 4000}], "next_node": "end"},
        "end": {"type": "terminate", "outputs": {"got": "{{got}}"}}}}}
    async with platform_of(nats_url, database_url, runtime_settings={"callback_timeout_s": 60},
                           gateway_settings={"ryw_timeout_ms": 1000}) as p:
        c = p.client
        async with serving(hybrid_agent()) as agent:
            await register_hybrid(c, agent)
            await imported(c, doc)
            run_id = await start_run(c, "audit_cb_par")
            deadline = asyncio.get_running_loop().time() + 20
            while not any(r.get("dispatch_mode") == "async" for r in agent.requests):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            token = next(r for r in agent.requests if r.get("dispatch_mode") == "async")["callback"]["token"]
            headers = {"X-LangOrch-Callback-Token": token}
            early = await c.post(f"/api/runs/{run_id}/callback", json={"output": {"session": "S"}}, headers=headers)
            body = problem(early, 409, "run_not_paused")
            assert body["current_status"] == "running"
            assert (await wait_status(c, run_id, ("paused", *TERMINAL)))["status"] == "paused"
            late = await c.post(f"/api/runs/{run_id}/callback", json={"output": {"session": "S"}}, headers=headers)
            assert late.status_code == 202, late.text
            run = await wait_status(c, run_id)
            events = (await c.get(f"/api/runs/{run_id}/events?limit=500")).json()["items"]
    assert run["status"] == "completed", run
    assert run["output_vars"]["got"] == {"session": "S"}
    assert "execution_recovered" not in [e["event_type"] for e in events]  # no resume reached it while it ran


async def test_a_decision_while_another_branch_still_runs_is_applied(platform: Platform) -> None:
    """api.md §6.3: the decision resumes the run. A run whose other parallel branch still executes takes the
    resume once it suspends (it used to be taken as a crash recovery: the decision was lost and the run hung)."""
    c = platform.client
    doc = {"procedure_id": "audit_apar", "version": "1", "workflow_graph": {"start_node": "fan", "nodes": {
        "fan": {"type": "parallel", "next_node": "end", "branches": [
            {"branch_id": "ask", "start_node": "gate"}, {"branch_id": "slow", "start_node": "nap"}]},
        "gate": {"type": "human_approval", "on_approve": "end", "on_reject": "end"},
        "nap": {"type": "processing", "operations": [{"action": "wait", "duration_ms": 2000}], "next_node": "end"},
        "end": {"type": "terminate", "outputs": {"d": "{{approval.gate.decision}}"}}}}}
    await imported(c, doc)
    run_id = await start_run(c, "audit_apar")
    deadline = asyncio.get_running_loop().time() + 20
    while not (items := (await c.get("/api/approvals", params={"run_id": run_id})).json()["items"]):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    r = await c.post(f"/api/approvals/{items[0]['approval_id']}/decision", json={"decision": "approved"})
    assert r.status_code == 200, r.text
    run = await wait_status(c, run_id)
    assert run["status"] == "completed", run
    assert run["output_vars"] == {"d": "approved"}
    events = (await c.get(f"/api/runs/{run_id}/events?limit=500")).json()["items"]
    assert "execution_recovered" not in [e["event_type"] for e in events]
