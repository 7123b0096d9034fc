"""Separation of duties and the actor everywhere (api.md §2.2, issue 15), with auth on and the whole stack running:

* an approver cannot start a run, an operator cannot decide the approval its run waits on, a viewer cannot
  mutate anything — and a refused request appends nothing;
* what each principal does carries that principal: the run's events, the approval's decision, the audit records
  (``auth_disabled: false``), the command log.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import Platform, pending_approval, platform_of, wait_status

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "duties-admin-password-1"
SECRET_KEY = "separation-of-duties-secret-key-32-bytes-or-more"
GATE = {"procedure_id": "sod_gate", "version": "1", "workflow_graph": {"start_node": "g", "nodes": {
    "g": {"type": "human_approval", "prompt": "ship it?", "on_approve": "done", "on_reject": "done"},
    "done": {"type": "terminate"}}}}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, agents=False,
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                             "bootstrap_admin_password": ADMIN_PASSWORD}) as p:
        yield p


async def principals(c: httpx.AsyncClient) -> dict[str, tuple[httpx.AsyncClient, str]]:
    """A client and its actor (``api_key:<key_id>``) per role, each holding an API key of only that role."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        r = await c.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        if r.status_code == 200:
            break
        assert asyncio.get_running_loop().time() < deadline, r.text
        await asyncio.sleep(0.2)
    admin = {"Authorization": f"Bearer {r.json()['access_token']}"}
    out = {}
    for role in ("viewer", "operator", "approver"):
        r = await c.post("/api/auth/api-keys", json={"name": f"sod-{role}", "roles": [role]}, headers=admin)
        assert r.status_code == 201, r.text
        client = httpx.AsyncClient(base_url=str(c.base_url), timeout=30, headers={"X-API-Key": r.json()["key"]})
        out[role] = (client, f"api_key:{r.json()['key_id']}")
    return out


def forbidden(r: httpx.Response, role: str) -> None:
    assert r.status_code == 403, r.text
    assert (r.json()["code"], r.json()["required_role"]) == ("forbidden", role)


async def run_events(c: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    r = await c.get(f"/api/runs/{run_id}/events", params={"limit": 500})
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def test_each_role_does_only_its_part_and_every_record_names_who_did_it(platform: Platform) -> None:
    who = await principals(platform.client)
    (viewer, _), (operator, operator_actor), (approver, approver_actor) = (
        who["viewer"], who["operator"], who["approver"])
    try:
        forbidden(await viewer.post("/api/procedures", json={"ckp_json": GATE}), "operator")
        forbidden(await approver.post("/api/procedures", json={"ckp_json": GATE}), "operator")
        r = await operator.post("/api/procedures", json={"ckp_json": GATE})
        assert r.status_code == 201, r.text

        start = {"procedure_id": "sod_gate", "procedure_version": "1"}
        forbidden(await approver.post("/api/runs", json=start), "operator")
        forbidden(await viewer.post("/api/runs", json=start), "operator")
        r = await operator.post("/api/runs", json=start, headers={"X-Request-ID": "sod-start"})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        approval = await pending_approval(viewer, run_id)
        approval_id = approval["approval_id"]
        before = await run_events(viewer, run_id)

        # the operator who started the run cannot decide on it; nor can a viewer; nothing is appended
        forbidden(await operator.post(f"/api/approvals/{approval_id}/decision", json={"decision": "approve"}),
                  "approver")
        forbidden(await viewer.post(f"/api/approvals/{approval_id}/decision", json={"decision": "approve"}),
                  "approver")
        for method, path in (("POST", f"/api/runs/{run_id}/cancel"), ("DELETE", f"/api/runs/{run_id}"),
                             ("POST", f"/api/runs/{run_id}/rerun"), ("POST", "/api/projects"),
                             ("PATCH", "/api/procedures/sod_gate/1/status")):
            body = {} if method != "DELETE" else None
            forbidden(await viewer.request(method, path, json=body), "operator")
        forbidden(await approver.post(f"/api/runs/{run_id}/cancel"), "operator")
        assert (await viewer.get(f"/api/approvals/{approval_id}")).json()["status"] == "pending"
        assert await run_events(viewer, run_id) == before

        # decided_by must be the authenticated principal
        r = await approver.post(f"/api/approvals/{approval_id}/decision",
                                json={"decision": "approve", "decided_by": operator_actor})
        assert (r.status_code, r.json()["code"]) == (422, "decided_by_mismatch"), r.text
        r = await approver.post(f"/api/approvals/{approval_id}/decision",
                                json={"decision": "approve", "decided_by": approver_actor})
        assert r.status_code == 200, r.text
        assert r.json()["decided_by"] == approver_actor
        assert (await wait_status(viewer, run_id))["status"] == "completed"

        # the actor everywhere: events, the command log, the audit records
        events = await run_events(viewer, run_id)
        actors = {e["event_type"]: e["actor"] for e in events}
        assert actors["run_created"] == operator_actor, actors
        received = next(e for e in events if e["event_type"] == "approval_decision_received")
        assert received["payload"]["decided_by"] == approver_actor, received
        decided = (await viewer.get(f"/api/approvals/{approval_id}")).json()
        assert (decided["status"], decided["decided_by"]) == ("approved", approver_actor)
        audit = (await viewer.get("/api/audit", params={"request_id": "sod-start", "limit": 50})).json()["items"]
        deadline = asyncio.get_running_loop().time() + 30
        while not audit:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
            audit = (await viewer.get("/api/audit", params={"request_id": "sod-start"})).json()["items"]
        assert {(x["action"], x["actor"], x["auth_disabled"]) for x in audit} == {("start", operator_actor, False)}
        assert audit[0]["actor_kind"] == "api_key"
    finally:
        for client, _ in who.values():
            await client.aclose()
