"""Contract of the approvals endpoints (api.md §6.2, §1.2, §1.4): status codes, problem codes, shapes, filters,
sorting and paging — against the real platform."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests import helpers
from tests.helpers import Platform, decide, pending_approval, platform_of, start_run, wait_status
from tests.test_approvals_end_to_end import procedure

pytestmark = pytest.mark.integration

APPROVAL_OUT = {"approval_id", "run_id", "procedure_id", "procedure_version", "node_id", "project_id", "prompt",
                "context_data", "decision_type", "options", "status", "decision", "decided_by", "decided_at",
                "comment", "decision_payload", "created_at", "expires_at", "timeout_action", "escalation_contact",
                "approval_level", "run_status"}
FIRST = procedure("c_first", {"on_approve": "approved_end", "on_reject": "rejected_end", "timeout_ms": 3_600_000,
                              "approval_level": "manager", "escalation_contact": "boss@example.com",
                              "context_data": {"amount": "{{amount}}", "api_key": "sk-live-123"}},
                  "approved_end", "rejected_end")
SECOND = procedure("c_second", {"decision_type": "select_option", "options": ["a", "b"], "on_approve": "approved_end",
                                "on_reject": "approved_end"}, "approved_end")


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        for doc in (FIRST, SECOND):
            r = await p.client.post("/api/procedures", json={"ckp_json": doc})
            assert r.status_code == 201, r.text
        yield p


@pytest.fixture(scope="module")
async def approvals(platform: Platform) -> dict[str, dict[str, Any]]:
    """Three approvals: ``first`` pending (expires in an hour), ``decided`` approved, ``other`` pending."""
    c = platform.client
    first = await pending_approval(c, await start_run(c, "c_first", {"amount": 5}))
    decided_run = await start_run(c, "c_first", {"amount": 6})
    decided = await pending_approval(c, decided_run)
    r = await decide(c, decided["approval_id"], decision="approved")
    assert r.status_code == 200, r.text
    await wait_status(c, decided_run, ("completed",))
    other = await pending_approval(c, await start_run(c, "c_second"))
    return {"first": first, "decided": (await c.get(f"/api/approvals/{decided['approval_id']}")).json(),
            "other": other}


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body = helpers.problem(r, status, code)
    assert body["type"] == f"urn:langorch:problem:{code}"
    assert body["status"] == status
    assert body["request_id"] == r.headers["X-Request-ID"]
    return body


async def test_detail_shape_and_redaction(platform: Platform, approvals: dict[str, dict[str, Any]]) -> None:
    c = platform.client
    r = await c.get(f"/api/approvals/{approvals['first']['approval_id']}")
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= APPROVAL_OUT
    assert body["context_data"] == {"amount": 5, "api_key": "***REDACTED***"}
    assert (body["approval_level"], body["escalation_contact"], body["timeout_action"]) == (
        "manager", "boss@example.com", None)
    assert body["expires_at"].endswith("Z")
    assert body["created_at"].endswith("Z")
    assert body["expires_at"] > body["created_at"]
    assert body["run_status"] == "waiting_approval"
    assert int(r.headers["X-LangOrch-Position"]) > 0
    missing = await c.get("/api/approvals/0192f7c4-0000-7000-8000-000000000000")
    assert problem(missing, 404, "not_found")["resource"] == "approval"


async def test_list_filters_sort_and_paging(platform: Platform, approvals: dict[str, dict[str, Any]]) -> None:
    c = platform.client
    first, decided, other = approvals["first"], approvals["decided"], approvals["other"]

    async def ids(**params: Any) -> list[str]:
        r = await c.get("/api/approvals", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert set(page) == {"items", "total", "limit", "offset"}
        assert all(set(item) >= APPROVAL_OUT for item in page["items"])
        return [item["approval_id"] for item in page["items"]]

    newest_first = [other["approval_id"], decided["approval_id"], first["approval_id"]]
    assert await ids() == newest_first
    assert await ids(order="asc") == newest_first[::-1]
    assert await ids(status="pending") == [other["approval_id"], first["approval_id"]]
    assert await ids(status="approved,canceled") == [decided["approval_id"]]
    assert await ids(status="timeout") == []  # the alias of timed_out is accepted
    assert await ids(run_id=first["run_id"]) == [first["approval_id"]]
    assert await ids(procedure_id="c_second") == [other["approval_id"]]
    assert await ids(node_id="review", decided_by="anonymous") == [decided["approval_id"]]
    assert await ids(project_id="nope") == []
    assert await ids(created_from=decided["created_at"]) == newest_first[:2]
    assert await ids(created_to=decided["created_at"]) == [first["approval_id"]]
    assert await ids(created_from="2000-01-01T00:00:00+02:00") == newest_first
    assert set(await ids(expires_before="2999-01-01T00:00:00Z")) == {first["approval_id"], decided["approval_id"]}
    # expires_at: approvals without expiry come last in both orders, the id breaks ties
    by_expiry = await ids(sort="expires_at", order="asc")
    assert by_expiry[-1] == other["approval_id"]
    assert by_expiry[:2] == [first["approval_id"], decided["approval_id"]]
    r = await c.get("/api/approvals", params={"limit": 1, "offset": 1})
    assert (r.json()["total"], r.json()["limit"], r.json()["offset"]) == (3, 1, 1)
    assert [i["approval_id"] for i in r.json()["items"]] == [decided["approval_id"]]
    past = (await c.get("/api/approvals", params={"offset": 10})).json()
    assert (past["items"], past["total"]) == ([], 3)


@pytest.mark.parametrize(("params", "field"), [
    ({"status": "pending,maybe"}, "query.status"), ({"limit": 0}, "query.limit"), ({"limit": 501}, "query.limit"),
    ({"offset": -1}, "query.offset"), ({"sort": "status"}, "query.sort"), ({"order": "up"}, "query.order"),
    ({"created_from": "2025-01-01T00:00:00"}, "query.created_from"), ({"expires_before": "soon"},
                                                                       "query.expires_before"),
])
async def test_list_rejects_bad_queries(platform: Platform, params: dict[str, Any], field: str) -> None:
    body = problem(await platform.client.get("/api/approvals", params=params), 422, "validation_failed")
    assert field in body["errors"]


async def test_list_honours_min_position(platform: Platform, approvals: dict[str, dict[str, Any]]) -> None:
    c = platform.client
    position = int((await c.get("/api/approvals")).headers["X-LangOrch-Position"])
    r = await c.get("/api/approvals", headers={"X-LangOrch-Min-Position": str(position)})
    assert r.status_code == 200
    assert "X-LangOrch-Consistency" not in r.headers
    stale = await c.get("/api/approvals", headers={"X-LangOrch-Min-Position": str(position + 10_000)})
    assert stale.status_code == 200
    assert stale.headers["X-LangOrch-Consistency"] == "stale"


async def test_decision_problems(platform: Platform, approvals: dict[str, dict[str, Any]]) -> None:
    c = platform.client
    first = approvals["first"]["approval_id"]
    url = f"/api/approvals/{first}/decision"
    problem(await c.post("/api/approvals/0192f7c4-0000-7000-8000-000000000000/decision",
                         json={"decision": "approved"}), 404, "not_found")
    assert problem(await c.post(url, json={"comment": "no decision"}), 422, "validation_failed")["errors"] == {
        "decision": ["This field is required"]}
    assert "verdict" in problem(await c.post(url, json={"decision": "approved", "verdict": 1}), 422,
                                "unknown_field")["errors"]
    disagree = problem(await c.post(url, json={"decision": "approved", "status": "reject"}), 422,
                       "validation_failed")
    assert set(disagree["errors"]) == {"decision", "status"}
    problem(await c.post(url, content=b"decision=approved", headers={"content-type": "text/plain"}), 415,
            "unsupported_media_type")
    problem(await c.post(url, content=b"{", headers={"content-type": "application/json"}), 400, "malformed_json")
    invalid = problem(await c.post(url, json={"decision": "maybe"}), 422, "invalid_decision")
    assert invalid["allowed"] == ["approved", "rejected"]
    mismatch = problem(await c.post(url, json={"decision": "approved", "decided_by": "user:bob"}), 422,
                       "decided_by_mismatch")
    assert "decided_by" in mismatch["errors"]
    decided = approvals["decided"]["approval_id"]
    conflict = problem(await c.post(f"/api/approvals/{decided}/decision", json={"decision": "rejected"}), 409,
                       "approval_not_pending")
    assert conflict["current_status"] == "approved"
    assert (await c.get(f"/api/approvals/{first}")).json()["status"] == "pending"


async def test_decision_is_idempotent_with_a_key(platform: Platform) -> None:
    c = platform.client
    run_id = await start_run(c, "c_second")
    approval = await pending_approval(c, run_id)
    url = f"/api/approvals/{approval['approval_id']}/decision"
    headers = {"Idempotency-Key": f"decide-{approval['approval_id']}"}
    first = await c.post(url, json={"decision": "b", "comment": "once"}, headers=headers)
    assert first.status_code == 200, first.text
    again = await c.post(url, json={"decision": "b", "comment": "once"}, headers=headers)
    assert again.status_code == 200
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    assert first.json()["status"] == "decided"
    problem(await c.post(url, json={"decision": "a"}, headers=headers), 422, "idempotency_key_reused")
    run = await wait_status(c, run_id, ("completed",))
    assert run["status"] == "completed"


async def test_stream_contract(platform: Platform) -> None:
    c = platform.client
    problem(await c.get("/api/approvals/stream", headers={"Last-Event-ID": "x"}), 422, "validation_failed")
    problem(await c.get("/api/approvals/stream", params={"status": "maybe"}), 422, "validation_failed")
    problem(await c.get("/api/approvals/stream", params={"after": -1}), 422, "validation_failed")
    async with c.stream("GET", "/api/approvals/stream", params={"after": 0}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines: list[str] = []
        async def first_update() -> None:
            async for line in r.aiter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    return
        await asyncio.wait_for(first_update(), 10)
    assert "event: approval_update" in lines
    assert any(line.startswith("id: ") and line[4:].isdigit() for line in lines)
