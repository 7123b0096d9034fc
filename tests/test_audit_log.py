"""The audit log (api.md §12): every command — accepted or rejected — yields exactly one record on ``LO_AUDIT``,
written by the service that decided it; ``GET /api/audit`` serves the ``audit_log`` projection (shapes, filters,
paging, 422s); records are redacted, survive run deletion and are reproduced by a projection rebuild."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from ckp_core.audit import record_entry
from ckp_core.commands import SetProcedureStatus
from ckp_core.events import ANONYMOUS, Actor, utc_now
from ckp_core.subjects import AUDIT_STREAM
from langorch_gateway.projector import rebuild
from langorch_infra.audit import AuditWriter
from langorch_infra.jetstream import ensure_topology, publish_command
from tests.helpers import Platform, decide, pending_approval, platform_of, wait_status

pytestmark = pytest.mark.integration

SECRET = "hunter2-very-secret-input"
AUDIT_ENTRY = {"event_id", "ts", "category", "action", "outcome", "actor", "actor_kind", "description",
               "resource_type", "resource_id", "request_id", "command_id", "correlation_id", "auth_disabled", "meta"}

SIMPLE = {"procedure_id": "au_simple", "version": "1",
          "variables_schema": {"n": {"type": "number", "required": True},
                               "pin": {"type": "string", "sensitive": True, "default": "none"}},
          "workflow_graph": {"start_node": "done", "nodes": {"done": {"type": "terminate",
                                                                      "outputs": {"n": "{{n}}"}}}}}
GATE = {"procedure_id": "au_gate", "version": "1", "workflow_graph": {"start_node": "g", "nodes": {
    "g": {"type": "human_approval", "on_approve": "e", "on_reject": "e"}, "e": {"type": "terminate"}}}}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        for doc in (SIMPLE, GATE):
            r = await p.client.post("/api/procedures", json={"ckp_json": doc}, headers={"X-Request-ID": "au-import"})
            assert r.status_code == 201, r.text
        yield p


async def audit(c: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    r = await c.get("/api/audit", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def records(c: httpx.AsyncClient, count: int, timeout: float = 15, **params: Any) -> list[dict[str, Any]]:
    """The records matching ``params`` once there are at least ``count`` (they land about a second after their
    outcome), then a short settle so that a wrongly duplicated record would show up too."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = await audit(c, **params, limit=500)
        if body["total"] >= count:
            await asyncio.sleep(0.5)
            items: list[dict[str, Any]] = (await audit(c, **params, limit=500))["items"]
            return items
        assert asyncio.get_running_loop().time() < deadline, (params, body)
        await asyncio.sleep(0.1)


async def run_to_end(c: httpx.AsyncClient, pid: str, inputs: dict[str, Any], request_id: str) -> str:
    r = await c.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1", "input_vars": inputs},
                     headers={"X-Request-ID": request_id})
    assert r.status_code == 201, r.text
    run_id = str(r.json()["run_id"])
    await wait_status(c, run_id, ("completed", "failed", "canceled"))
    return run_id


async def test_import_accepted_and_duplicate_import_rejected_once_each(platform: Platform) -> None:
    c = platform.client
    [accepted] = await records(c, 1, request_id="au-import", resource_id="au_simple")
    assert set(accepted) == AUDIT_ENTRY
    assert (accepted["category"], accepted["action"], accepted["outcome"]) == ("procedure", "import", "accepted")
    assert (accepted["actor"], accepted["actor_kind"], accepted["auth_disabled"]) == ("anonymous", "anonymous", True)
    assert accepted["resource_type"] == "procedure"
    assert accepted["event_id"] == accepted["command_id"]
    assert accepted["ts"].endswith("Z")
    document = accepted["meta"]["ckp_json"]  # summarised, not copied
    assert document["_summarised"] is True
    assert document["procedure_id"] == "au_simple"
    assert document["bytes"] > 0
    assert len(document["sha256"]) == 64
    assert "workflow_graph" not in document

    r = await c.post("/api/procedures", json={"ckp_json": SIMPLE}, headers={"X-Request-ID": "au-import-again"})
    assert r.status_code == 409, r.text
    [rejected] = await records(c, 1, request_id="au-import-again")
    assert (rejected["category"], rejected["action"], rejected["outcome"]) == ("procedure", "import", "rejected")
    assert rejected["meta"]["code"] == "procedure_version_exists"
    assert "procedure_version_exists" in rejected["description"]

    broken = {"procedure_id": "au_broken", "version": "1", "workflow_graph": {"start_node": "nowhere", "nodes": {
        "done": {"type": "terminate"}}}}
    r = await c.post("/api/procedures", json={"ckp_json": broken}, headers={"X-Request-ID": "au-invalid"})
    assert r.status_code == 422, r.text
    [invalid] = await records(c, 1, request_id="au-invalid")
    assert (invalid["category"], invalid["action"], invalid["outcome"]) == ("procedure", "import", "rejected")
    assert invalid["meta"]["code"] == "compile_failed"
    assert invalid["resource_id"] == "au_broken"
    assert invalid["meta"]["ckp_json"]["_summarised"] is True


async def test_run_start_is_audited_by_the_runtime_with_sensitive_inputs_redacted(platform: Platform) -> None:
    c = platform.client
    run_id = await run_to_end(c, "au_simple", {"n": 3, "pin": SECRET}, "au-start")
    [start] = await records(c, 1, category="run", action="start", resource_id=run_id)
    assert start["outcome"] == "accepted"
    assert start["request_id"] == "au-start"  # the request id travels as the command's causation id
    assert start["correlation_id"] == run_id
    assert start["meta"]["input_vars"] == {"n": 3, "pin": "***REDACTED***"}
    assert start["meta"]["procedure_id"] == "au_simple"
    everything = (await c.get("/api/audit", params={"limit": 500})).text
    assert SECRET not in everything


async def test_cancel_of_a_finished_run_is_rejected_and_delete_keeps_the_records(platform: Platform) -> None:
    c = platform.client
    run_id = await run_to_end(c, "au_simple", {"n": 1}, "au-finished")
    r = await c.post(f"/api/runs/{run_id}/cancel", headers={"X-Request-ID": "au-cancel"})
    assert r.status_code == 409, r.text
    [cancel] = await records(c, 1, request_id="au-cancel")
    assert (cancel["category"], cancel["action"], cancel["outcome"]) == ("run", "cancel", "rejected")
    assert cancel["meta"]["code"] == "invalid_run_transition"
    assert cancel["resource_id"] == run_id

    r = await c.delete(f"/api/runs/{run_id}", headers={"X-Request-ID": "au-delete"})
    assert r.status_code == 200, r.text
    [deleted] = await records(c, 1, request_id="au-delete")
    assert (deleted["category"], deleted["action"], deleted["outcome"]) == ("run", "delete", "accepted")
    assert (await c.get(f"/api/runs/{run_id}")).status_code == 404
    about_run = await records(c, 3, resource_type="run", resource_id=run_id)
    assert sorted(x["action"] for x in about_run) == ["cancel", "delete", "start"]  # they survive the deletion


async def test_second_decision_is_a_rejected_record(platform: Platform) -> None:
    c = platform.client
    r = await c.post("/api/runs", json={"procedure_id": "au_gate", "procedure_version": "1"})
    run_id = r.json()["run_id"]
    approval = await pending_approval(c, run_id)
    aid = approval["approval_id"]
    assert (await decide(c, aid, decision="approved")).status_code == 200
    assert (await decide(c, aid, decision="rejected")).status_code == 409
    decisions = await records(c, 2, category="approval", action="decide", resource_id=aid)
    assert [x["outcome"] for x in decisions] == ["rejected", "accepted"]  # newest first
    assert decisions[0]["meta"]["code"] == "approval_not_pending"
    assert decisions[1]["meta"]["decision"] == "approved"
    [requested] = await records(c, 1, category="approval", action="request", resource_id=aid)
    assert requested["actor"] == "system:runtime"


async def test_checkpoint_read_is_recorded(platform: Platform) -> None:
    c = platform.client
    run_id = await run_to_end(c, "au_simple", {"n": 2}, "au-cp-run")
    first = (await c.get(f"/api/runs/{run_id}/checkpoints")).json()["items"][0]
    r = await c.get(f"/api/runs/{run_id}/checkpoints/{first['checkpoint_id']}", headers={"X-Request-ID": "au-cp"})
    assert r.status_code == 200, r.text
    [viewed] = await records(c, 1, request_id="au-cp")
    assert (viewed["category"], viewed["action"], viewed["outcome"]) == ("run", "checkpoint_viewed", "accepted")
    assert viewed["resource_id"] == run_id
    assert viewed["meta"]["checkpoint_id"] == first["checkpoint_id"]
    assert viewed["command_id"] is None


async def test_a_command_handled_twice_yields_one_record(platform: Platform) -> None:
    """The same command delivered twice (as after a crash before its ack): two publishes with distinct message
    ids, so JetStream does not drop the second; the compiler finds its outcome and audits it again."""
    c = platform.client
    js = platform.app.state.js
    command = SetProcedureStatus(actor=ANONYMOUS, causation_id="au-twice", procedure_id="au_gate", version="1",
                                 status="deprecated")
    await publish_command(js, command, msg_id="au-twice-1")
    await records(c, 1, request_id="au-twice")
    await publish_command(js, command, msg_id="au-twice-2")
    await asyncio.sleep(1.5)
    [only] = await records(c, 1, request_id="au-twice")
    assert (only["category"], only["action"], only["command_id"]) == ("procedure", "set_status", command.command_id)
    info = await js.stream_info(AUDIT_STREAM)
    assert info.state.messages >= 1


async def seed(c: httpx.AsyncClient, request_id: str) -> None:
    """Records of each kind the filters pick, made by this test (the module's other tests may run elsewhere):
    a completed run's start, and a rejected cancel of it."""
    run_id = await run_to_end(c, "au_simple", {"n": 4}, request_id)
    r = await c.post(f"/api/runs/{run_id}/cancel", headers={"X-Request-ID": request_id})
    assert r.status_code == 409, r.text
    await records(c, 2, request_id=request_id)


async def test_filters_paging_and_422s(platform: Platform) -> None:
    c = platform.client
    await seed(c, "au-filters")
    everything = await audit(c, limit=500)
    assert set(everything) == {"items", "total", "limit", "offset"}
    assert everything["total"] == len(everything["items"]) >= 4  # 2 imports, the start and the cancel
    stamps = [(x["ts"], x["event_id"]) for x in everything["items"]]
    assert stamps == sorted(stamps, reverse=True)  # newest first

    both = await audit(c, category="procedure,approval", limit=500)
    assert both["total"] > 0
    assert {x["category"] for x in both["items"]} <= {"procedure", "approval"}
    actions = await audit(c, action="start,cancel", limit=500)
    assert {x["action"] for x in actions["items"]} == {"start", "cancel"}
    rejected = await audit(c, outcome="rejected", limit=500)
    assert rejected["total"] > 0
    assert all(x["outcome"] == "rejected" for x in rejected["items"])
    system = await audit(c, actor_kind="system", limit=500)
    assert all(x["actor_kind"] == "system" for x in system["items"])
    assert (await audit(c, actor="system:runtime"))["total"] == system["total"]
    assert (await audit(c, resource_type="procedure", resource_id="au_gate"))["total"] >= 1
    searched = await audit(c, search="CHECKPOINT_VIEWED")
    assert all("checkpoint_viewed" in x["description"] for x in searched["items"])

    newest = everything["items"][0]["ts"]
    assert (await audit(c, since=newest))["total"] >= 1
    assert (await audit(c, until=newest))["total"] == everything["total"] - (await audit(c, since=newest))["total"]
    assert (await audit(c, since="2999-01-01T00:00:00+02:00"))["total"] == 0

    page = await audit(c, limit=2, offset=1)
    assert (page["limit"], page["offset"], page["total"]) == (2, 1, everything["total"])
    assert page["items"] == everything["items"][1:3]
    past = await audit(c, offset=everything["total"] + 5)
    assert (past["items"], past["total"]) == ([], everything["total"])

    for params, field in (({"limit": 0}, "query.limit"), ({"limit": 501}, "query.limit"),
                          ({"offset": -1}, "query.offset"), ({"offset": 2**63}, "query.offset"),
                          ({"outcome": "maybe"}, "query.outcome"), ({"actor_kind": "robot"}, "query.actor_kind"),
                          ({"since": "2025-01-01T00:00:00"}, "query.since"), ({"until": "yesterday"}, "query.until")):
        r = await c.get("/api/audit", params=params)
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert field in r.json()["errors"], (params, r.json())


async def test_rebuild_reproduces_the_audit_log(platform: Platform) -> None:
    c = platform.client
    await seed(c, "au-rebuild")
    app = platform.app
    await app.state.audit_projector.catch_up()
    query = "SELECT * FROM audit_log ORDER BY event_id"
    before = [tuple(r.values()) for r in await app.state.pool.fetch(query)]
    assert len(before) >= 4
    await app.state.projector.stop()  # the rebuild replays into fresh tables; nothing else may write them
    await app.state.audit_projector.stop()
    await rebuild(app.state.pool, app.state.js)
    after = [tuple(r.values()) for r in await app.state.pool.fetch(query)]
    assert after == before
    position = await app.state.pool.fetchval("SELECT position FROM projection_positions WHERE name = 'audit'")
    assert position == (await app.state.js.stream_info(AUDIT_STREAM)).state.last_seq
    app.state.projector.start()
    app.state.audit_projector.start()


async def test_records_older_than_the_retention_are_not_kept(platform: Platform) -> None:
    """``audit_log`` keeps what ``LO_AUDIT`` keeps: LANGORCH_AUDIT_RETENTION_DAYS (365 by default)."""
    c = platform.client
    writer = AuditWriter(platform.app.state.js)
    old = record_entry("auth", "login", Actor(kind="user", id="old"), request_id="au-old")
    old.ts = utc_now() - timedelta(days=400)
    assert await writer.write(old)
    assert await writer.write(record_entry("auth", "login", Actor(kind="user", id="new"), request_id="au-new"))
    [fresh] = await records(c, 1, request_id="au-new")
    assert (fresh["actor"], fresh["actor_kind"], fresh["auth_disabled"]) == ("user:new", "user", False)
    await platform.app.state.audit_projector.catch_up()
    assert (await audit(c, request_id="au-old"))["total"] == 0


async def test_lo_audit_max_age_follows_the_retention_setting(platform: Platform) -> None:
    js = platform.app.state.js
    day = 86400.0
    assert (await js.stream_info(AUDIT_STREAM)).config.max_age == 365 * day
    await ensure_topology(js, audit_retention_days=30)
    assert (await js.stream_info(AUDIT_STREAM)).config.max_age == 30 * day
    await ensure_topology(js)  # a caller without the setting leaves the retention alone
    assert (await js.stream_info(AUDIT_STREAM)).config.max_age == 30 * day
    await ensure_topology(js, audit_retention_days=365)
    assert (await js.stream_info(AUDIT_STREAM)).config.max_age == 365 * day


async def test_rerun_of_an_archived_version_is_a_rejected_start(platform: Platform) -> None:
    c = platform.client
    doc = SIMPLE | {"procedure_id": "au_archived"}
    assert (await c.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
    run_id = await run_to_end(c, "au_archived", {"n": 1}, "au-archived-run")
    r = await c.patch("/api/procedures/au_archived/1/status", json={"status": "archived"})
    assert r.status_code == 200, r.text
    [status] = await records(c, 1, category="procedure", action="set_status", resource_id="au_archived")
    assert (status["outcome"], status["meta"]["status"]) == ("accepted", "archived")
    r = await c.post(f"/api/runs/{run_id}/rerun", json={}, headers={"X-Request-ID": "au-rerun"})
    assert r.status_code == 409, r.text
    [rerun] = await records(c, 1, request_id="au-rerun")
    assert (rerun["category"], rerun["action"], rerun["outcome"]) == ("run", "start", "rejected")
    assert rerun["meta"]["code"] == "procedure_not_runnable"
    assert rerun["meta"]["rerun_of"] == run_id


async def test_refused_run_starts_are_rejected_records(platform: Platform) -> None:
    """Inputs that fail validation (422) and a start of an archived version (409) are decided refusals of
    ``run/start``; the refused input value itself stays out of the record."""
    c = platform.client
    r = await c.post("/api/runs", json={"procedure_id": "au_simple", "procedure_version": "1",
                                        "input_vars": {"n": SECRET}}, headers={"X-Request-ID": "au-bad-inputs"})
    assert r.status_code == 422, r.text
    [bad] = await records(c, 1, request_id="au-bad-inputs")
    assert (bad["category"], bad["action"], bad["outcome"]) == ("run", "start", "rejected")
    assert bad["meta"]["code"] == "invalid_input_vars"
    assert bad["meta"]["procedure_id"] == "au_simple"
    assert SECRET not in json.dumps(bad)
    doc = SIMPLE | {"procedure_id": "au_archived_start"}
    assert (await c.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
    r = await c.patch("/api/procedures/au_archived_start/1/status", json={"status": "archived"})
    assert r.status_code == 200, r.text
    r = await c.post("/api/runs", json={"procedure_id": "au_archived_start", "procedure_version": "1"},
                     headers={"X-Request-ID": "au-archived-start"})
    assert r.status_code == 409, r.text
    [archived] = await records(c, 1, request_id="au-archived-start")
    assert (archived["outcome"], archived["meta"]["code"]) == ("rejected", "procedure_not_runnable")
    r = await c.post("/api/runs", json={"procedure_id": "au_nope", "procedure_version": "1"},
                     headers={"X-Request-ID": "au-missing"})
    assert r.status_code == 404
    await asyncio.sleep(1)
    assert (await audit(c, request_id="au-missing"))["total"] == 0  # not found: nothing was decided
