"""``GET /api/runs/{run_id}/graph`` (api.md §5.8): the version's GraphOut plus each node's status in the run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import Platform, decide, pending_approval, platform_of, wait_status

pytestmark = pytest.mark.integration

DOC = {
    "procedure_id": "rg", "version": "1",
    "workflow_graph": {"start_node": "each", "nodes": {
        "each": {"type": "loop", "iterator": "[1, 2, 3]", "iterator_variable": "n", "body_node": "body",
                 "next_node": "review"},
        "body": {"type": "processing", "operations": [{"action": "log", "message": "{{n}}"}]},
        "review": {"type": "human_approval", "prompt": "Go?", "on_approve": "ok", "on_reject": "no"},
        "ok": {"type": "terminate", "outputs": {}},
        "no": {"type": "terminate", "status": "failed", "outputs": {}}}},
}
NODE_STATUS = {"status", "started_at", "ended_at", "attempts", "last_seq"}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        assert (await p.client.post("/api/procedures", json={"ckp_json": DOC})).status_code == 201
        yield p


async def start(c: httpx.AsyncClient) -> str:
    r = await c.post("/api/runs", json={"procedure_id": "rg", "procedure_version": "1"})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


async def graph(c: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    r = await c.get(f"/api/runs/{run_id}/graph")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_paused_then_completed(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c)
    approval = await pending_approval(c, run_id)
    g = await graph(c, run_id)
    assert set(g) == {"run_id", "procedure_id", "procedure_version", "graph", "graph_unavailable_reason",
                      "node_status", "current_node_ids"}
    assert (g["run_id"], g["procedure_id"], g["procedure_version"]) == (run_id, "rg", "1")
    assert g["graph_unavailable_reason"] is None
    assert {n["id"] for n in g["graph"]["nodes"]} == {"each", "body", "review", "ok", "no"}
    assert {(e["source"], e["target"], e["kind"]) for e in g["graph"]["edges"]} >= {
        ("each", "body", "loop_body"), ("review", "ok", "approve"), ("review", "no", "reject")}
    status = g["node_status"]
    assert all(set(s) == NODE_STATUS for s in status.values())
    assert {n: s["status"] for n, s in status.items()} == {
        "each": "completed", "body": "completed", "review": "paused", "ok": "not_started", "no": "not_started"}
    assert status["body"]["attempts"] == 3
    assert status["each"]["started_at"] <= status["body"]["started_at"] <= status["body"]["ended_at"]
    assert status["review"]["ended_at"] is None
    assert status["ok"] == {"status": "not_started", "started_at": None, "ended_at": None, "attempts": 0,
                            "last_seq": None}
    assert status["review"]["last_seq"] > status["body"]["last_seq"] > 0
    assert g["current_node_ids"] == ["review"]

    assert (await decide(c, approval["approval_id"], decision="approved")).status_code == 200
    await wait_status(c, run_id, ("completed",))
    g = await graph(c, run_id)
    assert {n: s["status"] for n, s in g["node_status"].items()} == {
        "each": "completed", "body": "completed", "review": "completed", "ok": "completed", "no": "skipped"}
    assert g["current_node_ids"] == []


async def test_cancel_while_paused_marks_the_node_canceled(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c)
    await pending_approval(c, run_id)
    assert (await c.post(f"/api/runs/{run_id}/cancel", json={})).status_code in (200, 202)
    await wait_status(c, run_id, ("canceled",))
    g = await graph(c, run_id)
    assert g["node_status"]["review"]["status"] == "canceled"
    assert g["node_status"]["ok"]["status"] == "skipped"
    assert g["current_node_ids"] == []


async def test_unknown_run_is_404(platform: Platform) -> None:
    r = await platform.client.get("/api/runs/nope/graph")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_deleted_version_gives_a_null_graph_with_a_reason(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "rg_gone", "version": "1", "workflow_graph": {"start_node": "done", "nodes": {
        "done": {"type": "terminate", "outputs": {}}}}}
    assert (await c.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
    r = await c.post("/api/runs", json={"procedure_id": "rg_gone", "procedure_version": "1"})
    run_id = r.json()["run_id"]
    await wait_status(c, run_id, ("completed",))
    r = await c.delete("/api/procedures/rg_gone/1")
    assert r.status_code == 200, r.text
    g = await graph(c, run_id)
    assert g["graph"] is None
    assert "deleted" in g["graph_unavailable_reason"]
    assert g["node_status"]["done"]["status"] == "completed"
