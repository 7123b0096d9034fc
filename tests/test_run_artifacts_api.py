"""Contract tests of api.md §5.8: run artifacts (list, detail, content with Range, links) and run diagnostics,
with a real HTTP agent returning inline and linked artifacts; deleting the run removes its lo_steps keys and its
stored artifact content (§5.6)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.js.errors import NotFoundError, ObjectNotFoundError

from langorch_infra.jetstream import JetStreamEventStore
from langorch_infra.kv import kv_live
from tests import helpers
from tests.helpers import Platform, platform_of, register_agent, start_document, wait_status
from tests.scripted_agent import ScriptedAgent, serving

pytestmark = pytest.mark.integration

CONTENT = b"hello artifact world"
DOC = {"procedure_id": "art_maker", "version": "1", "workflow_graph": {"start_node": "make", "nodes": {
    "make": {"type": "sequence", "agent": "API", "next_node": "done", "steps": [
        {"step_id": "produce", "action": "produce", "output_variable": "made"}]},
    "done": {"type": "terminate", "outputs": {"ok": "yes"}}}}}


def produce(body: dict[str, Any]) -> dict[str, Any]:
    return {"artifact": {"kind": "file", "name": "report.txt", "mime_type": "text/plain",
                         "content_base64": base64.b64encode(CONTENT).decode()},
            "artifact_uri": "https://example.com/report.pdf", "artifact_kind": "link"}


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


def is_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body = helpers.problem(r, status, code)
    assert body["status"] == status
    return body


ARTIFACT_FIELDS = {"artifact_id", "run_id", "node_id", "step_id", "kind", "name", "uri", "mime_type", "size_bytes",
                   "sha256", "stored", "download_url", "created_at"}


async def test_artifacts_content_diagnostics_and_delete(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"produce": produce})
    async with serving(agent):
        await register_agent(c, agent, "api")
        run_id = await start_document(c, DOC)
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]

    page = (await c.get(f"/api/runs/{run_id}/artifacts")).json()
    assert set(page) == {"items", "total", "limit", "offset"}
    assert page["total"] == 2
    by_kind = {a["kind"]: a for a in page["items"]}
    assert set(by_kind) == {"file", "link"}
    stored, link = by_kind["file"], by_kind["link"]
    assert set(stored) == ARTIFACT_FIELDS
    assert stored["stored"] is True
    assert stored["run_id"] == run_id
    assert stored["node_id"] == "make"
    assert stored["step_id"] == "produce"
    assert stored["name"] == "report.txt"
    assert stored["mime_type"] == "text/plain"
    assert stored["size_bytes"] == len(CONTENT)
    assert stored["download_url"] == f"/api/runs/{run_id}/artifacts/{stored['artifact_id']}/content"
    assert link["stored"] is False
    assert link["uri"] == "https://example.com/report.pdf"
    assert (await c.get(f"/api/runs/{run_id}/artifacts", params={"kind": "link"})).json()["total"] == 1
    assert (await c.get(f"/api/runs/{run_id}/artifacts", params={"node_id": "nope"})).json()["total"] == 0
    assert (await c.get(f"/api/runs/{run_id}/artifacts", params={"offset": 5})).json()["items"] == []
    is_problem(await c.get(f"/api/runs/{run_id}/artifacts", params={"limit": 501}), 422, "validation_failed")

    detail = await c.get(f"/api/runs/{run_id}/artifacts/{stored['artifact_id']}")
    assert detail.status_code == 200
    assert detail.json() == stored
    is_problem(await c.get(f"/api/runs/{run_id}/artifacts/0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10"), 404, "not_found")
    is_problem(await c.get("/api/runs/0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10/artifacts"), 404, "not_found")

    url = stored["download_url"]
    full = await c.get(url)
    assert full.status_code == 200
    assert full.content == CONTENT
    assert full.headers["content-type"].startswith("text/plain")
    assert full.headers["content-disposition"].startswith("attachment")
    assert full.headers["x-content-type-options"] == "nosniff"
    assert full.headers["content-security-policy"] == "sandbox"
    part = await c.get(url, headers={"Range": "bytes=0-4"})
    assert part.status_code == 206
    assert part.content == b"hello"
    assert part.headers["content-range"] == f"bytes 0-4/{len(CONTENT)}"
    tail = await c.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206
    assert tail.content == CONTENT[-5:]
    rest = await c.get(url, headers={"Range": "bytes=6-"})
    assert rest.content == CONTENT[6:]
    refused = is_problem(await c.get(url, headers={"Range": "bytes=100-200"}), 416, "range_not_satisfiable")
    assert refused["instance"] == url
    external = is_problem(await c.get(f"/api/runs/{run_id}/artifacts/{link['artifact_id']}/content"), 409,
                          "artifact_external")
    assert external["uri"] == "https://example.com/report.pdf"

    alias = await c.get(f"/api/artifacts/{run_id}/report.txt")  # api.md §1.8, resolved by name
    assert alias.status_code == 200
    assert alias.content == CONTENT
    assert (await c.get(f"/api/artifacts/{run_id}/report.txt", headers={"Range": "bytes=0-4"})).content == b"hello"
    is_problem(await c.get(f"/api/artifacts/{run_id}/missing.txt"), 404, "not_found")

    diag = (await c.get(f"/api/runs/{run_id}/diagnostics")).json()
    for field in ("run_id", "thread_id", "status", "last_node_id", "last_step_id", "retry_count", "waiting_on",
                  "has_retry_event", "idempotency_entries", "active_leases", "total_events", "error_events",
                  "events_by_type", "execution"):
        assert field in diag, field
    assert diag["run_id"] == diag["thread_id"] == run_id
    assert diag["status"] == "completed"
    assert diag["has_retry_event"] is False
    assert diag["error_events"] == 0
    assert diag["events_by_type"]["artifact_created"] == 2
    assert diag["events_by_type"]["run_completed"] == 1
    assert diag["total_events"] == sum(diag["events_by_type"].values())
    assert diag["active_leases"] == []
    [entry] = diag["idempotency_entries"]
    assert entry["node_id"] == "make"
    assert entry["step_id"] == "produce"
    assert entry["status"] == "completed"
    assert entry["has_cached_result"] is True
    assert entry["idempotency_key"].startswith(f"lo1:{run_id}:make:produce:")
    assert set(diag["execution"]) == {"runtime_instance", "delivery_count", "last_progress_at", "checkpoint_count",
                                      "last_checkpoint_id"}
    assert diag["execution"]["delivery_count"] == 1
    # the runtime replica that executed it (this process; no LANGORCH_INSTANCE_ID set): hostname-pid
    assert diag["execution"]["runtime_instance"] == f"{socket.gethostname()}-{os.getpid()}"
    is_problem(await c.get("/api/runs/0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10/diagnostics"), 404, "not_found")

    db = await asyncpg.connect(platform.database_url)
    try:
        checkpoints = "SELECT count(*) FROM checkpoints WHERE thread_id = $1"
        assert await db.fetchval(checkpoints, run_id) > 0
        r = await c.delete(f"/api/runs/{run_id}")
        for _ in range(100):  # the runtime deletes the LangGraph thread after appending run_deleted
            if await db.fetchval(checkpoints, run_id) == 0:
                break
            await asyncio.sleep(0.05)
        assert await db.fetchval(checkpoints, run_id) == 0
    finally:
        await db.close()
    assert r.status_code == 200, r.text
    is_problem(await c.get(f"/api/runs/{run_id}/artifacts"), 404, "not_found")
    nc = await nats.connect(platform.nats_url)
    try:
        js = nc.jetstream()
        store = await js.object_store("lo_artifacts")
        for _ in range(100):  # the runtime purges after appending run_deleted
            keys = await kv_live(js, "lo_steps", f"{run_id}.>")
            try:
                await store.get(stored["artifact_id"])
                content_left = True
            except (NotFoundError, ObjectNotFoundError):
                content_left = False
            if not keys and not content_left:
                break
            await asyncio.sleep(0.05)
        assert keys == []
        assert content_left is False
        left = await JetStreamEventStore(js).read("run", run_id)
        assert [e.envelope.type for e in left] == ["run_deleted"]  # earlier events purged, the tombstone kept
    finally:
        await nc.close()
