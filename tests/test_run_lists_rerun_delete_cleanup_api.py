"""Contract tests of api.md §5.3 list filters, §5.5 rerun, §5.6 delete and cleanup, §5.9 children, against the
real platform (gateway, runtime, compiler, approvals on NATS and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import nats
import pytest

from ckp_core.commands import DeleteRun
from ckp_core.events import ANONYMOUS
from langorch_infra.jetstream import publish_command
from tests import helpers
from tests.helpers import Platform, imported, platform_of, start_run, wait_status, wait_until

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        yield p


def simple(pid: str) -> dict[str, Any]:
    """Completes for ``n >= 0``, fails (terminate ``failed``) for ``n < 0``."""
    return {"procedure_id": pid, "version": "1",
            "variables_schema": {"n": {"type": "number", "required": True, "validation": {"max": 100}}},
            "workflow_graph": {"start_node": "check", "nodes": {
                "check": {"type": "logic", "rules": [{"condition": "n < 0", "next_node": "bad"}],
                          "default_next_node": "done"},
                "bad": {"type": "terminate", "status": "failed", "outputs": {"why": "negative"}},
                "done": {"type": "terminate", "outputs": {"n": "{{n}}"}}}}}


def gate(pid: str) -> dict[str, Any]:
    return {"procedure_id": pid, "version": "1", "workflow_graph": {"start_node": "g", "nodes": {
        "g": {"type": "human_approval", "on_approve": "e", "on_reject": "e"}, "e": {"type": "terminate"}}}}








async def gone(c: httpx.AsyncClient, run_id: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await c.get(f"/api/runs/{run_id}")).status_code != 404:
        assert asyncio.get_running_loop().time() < deadline, run_id
        await asyncio.sleep(0.05)


def is_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body = helpers.problem(r, status, code)
    assert body["status"] == status
    assert body["type"] == f"urn:langorch:problem:{code}"
    return body


async def test_list_filters_sort_and_paging(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("lf_simple"))
    await imported(c, gate("lf_gate"))
    ok = [await start_run(c, "lf_simple", {"n": i}) for i in range(3)]
    bad = await start_run(c, "lf_simple", {"n": -1})
    waiting = await start_run(c, "lf_gate")
    for run_id in [*ok, bad]:
        await wait_status(c, run_id)
    await wait_status(c, waiting, ("waiting_approval",))
    r = await c.post(f"/api/runs/{waiting}/cancel", json={})
    assert r.status_code in (200, 202), r.text
    await wait_status(c, waiting)

    page = (await c.get("/api/runs", params={"procedure_id": "lf_simple"})).json()
    assert set(page) == {"items", "total", "limit", "offset"}
    assert page["total"] == 4
    assert page["limit"] == 100
    assert page["offset"] == 0
    assert [r["run_id"] for r in page["items"]] == sorted([*ok, bad], reverse=True)  # newest first (UUIDv7)

    failed = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "status": "failed"})).json()
    assert [r["run_id"] for r in failed["items"]] == [bad]
    assert failed["total"] == 1
    assert (await c.get("/api/runs", params={"status": "cancelled"})).json()["items"][0]["run_id"] == waiting
    multi = (await c.get("/api/runs", params={"status": "failed,cancelled"})).json()
    assert {r["run_id"] for r in multi["items"]} >= {bad, waiting}
    assert all(r["status"] in ("failed", "canceled") for r in multi["items"])

    api = (await c.get("/api/runs", params={"trigger_type": "api,manual", "procedure_id": "lf_simple"})).json()
    assert api["total"] == 4
    assert (await c.get("/api/runs", params={"trigger_type": "subflow", "procedure_id": "lf_simple"})
            ).json()["total"] == 0
    assert (await c.get("/api/runs", params={"procedure_id": "lf_simple", "procedure_version": "2"})
            ).json()["total"] == 0
    assert (await c.get("/api/runs", params={"procedure_id": "lf_simple", "top_level": "true"})).json()["total"] == 4
    assert (await c.get("/api/runs", params={"procedure_id": "lf_simple", "top_level": "false"})).json()["total"] == 0
    assert (await c.get("/api/runs", params={"project_id": "no_such_project"})).json()["total"] == 0

    # created_from inclusive, created_to exclusive, any RFC 3339 offset
    runs = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "order": "asc"})).json()["items"]
    assert [r["run_id"] for r in runs] == sorted([*ok, bad])
    second = runs[1]["created_at"]
    frm = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "created_from": second})).json()
    assert frm["total"] == 3
    to = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "created_to": second})).json()
    assert [r["run_id"] for r in to["items"]] == [runs[0]["run_id"]]
    at = datetime.fromisoformat(second.replace("Z", "+00:00")).astimezone(timezone(timedelta(hours=2)))
    shifted = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "created_from": at.isoformat()})).json()
    assert shifted["total"] == 3

    ended = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "sort": "ended_at", "order": "asc"}))
    assert ended.status_code == 200
    ends = [r["ended_at"] for r in ended.json()["items"]]
    assert ends == sorted(ends)
    assert (await c.get("/api/runs", params={"sort": "duration_seconds"})).status_code == 200
    assert (await c.get("/api/runs", params={"sort": "updated_at", "order": "asc"})).status_code == 200

    p1 = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "limit": 3})).json()
    p2 = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "limit": 3, "offset": 3})).json()
    assert len(p1["items"]) == 3
    assert len(p2["items"]) == 1
    assert p2["total"] == 4
    assert not {r["run_id"] for r in p1["items"]} & {r["run_id"] for r in p2["items"]}
    past = (await c.get("/api/runs", params={"procedure_id": "lf_simple", "offset": 50})).json()
    assert past["items"] == []
    assert past["total"] == 4
    assert past["offset"] == 50

    body = is_problem(await c.get("/api/runs", params={"created_from": "2025-01-01T00:00:00"}), 422,
                      "validation_failed")
    assert "query.created_from" in body["errors"]
    body = is_problem(await c.get("/api/runs", params={"created_to": "yesterday"}), 422, "validation_failed")
    assert "query.created_to" in body["errors"]
    for bad_query in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"sort": "name"}, {"order": "up"},
                      {"status": "exploded"}, {"trigger_type": "carrier_pigeon"}, {"top_level": "maybe"}):
        body = is_problem(await c.get("/api/runs", params=bad_query), 422, "validation_failed")
        assert f"query.{next(iter(bad_query))}" in body["errors"], body


async def test_rerun_creates_a_new_run(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("rr_simple"))
    first = await start_run(c, "rr_simple", {"n": 7})
    await wait_status(c, first)

    r = await c.post(f"/api/runs/{first}/rerun", json={})
    assert r.status_code == 201, r.text
    again = r.json()
    assert r.headers["location"] == f"/api/runs/{again['run_id']}"
    assert again["run_id"] != first
    assert again["rerun_of"] == first
    assert again["trigger_type"] == "api"
    assert again["triggered_by"] == f"rerun:{first}"
    assert again["procedure_version"] == "1"
    assert again["input_vars"]["n"] == 7
    assert (await wait_status(c, again["run_id"]))["output_vars"] == {"n": 7}

    r = await c.post(f"/api/runs/{first}/rerun", json={"input_vars": {"n": 9}, "procedure_version": "1"})
    assert r.status_code == 201, r.text
    assert (await wait_status(c, r.json()["run_id"]))["output_vars"] == {"n": 9}

    listed = (await c.get("/api/runs", params={"rerun_of": first})).json()
    assert listed["total"] == 2
    assert all(x["rerun_of"] == first for x in listed["items"])

    body = is_problem(await c.post(f"/api/runs/{first}/rerun", json={"input_vars": {"n": 1000}}), 422,
                      "invalid_input_vars")
    assert "input_vars.n" in body["errors"]
    body = is_problem(await c.post(f"/api/runs/{first}/rerun", json={"input_vars": {}}), 422, "invalid_input_vars")
    assert "input_vars.n" in body["errors"]
    is_problem(await c.post(f"/api/runs/{first}/rerun", json={"procedure_version": "9"}), 404, "not_found")
    is_problem(await c.post(f"/api/runs/{first}/rerun", json={"bogus": 1}), 422, "unknown_field")
    is_problem(await c.post("/api/runs/0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10/rerun", json={}), 404, "not_found")

    # ⟳: the same Idempotency-Key replays the first answer
    h = {"Idempotency-Key": "rerun-once"}
    one = await c.post(f"/api/runs/{first}/rerun", json={}, headers=h)
    two = await c.post(f"/api/runs/{first}/rerun", json={}, headers=h)
    assert one.status_code == two.status_code == 201
    assert one.json()["run_id"] == two.json()["run_id"]
    assert two.headers.get("idempotent-replayed") == "true"


async def test_delete_terminal_runs_only(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("del_simple"))
    await imported(c, gate("del_gate"))
    done = await start_run(c, "del_simple", {"n": 1})
    waiting = await start_run(c, "del_gate")
    await wait_status(c, done)
    await wait_status(c, waiting, ("waiting_approval",))

    body = is_problem(await c.delete(f"/api/runs/{waiting}"), 409, "invalid_run_transition")
    assert body["current_status"] == "waiting_approval"
    assert "delete" not in body["allowed"]
    assert "cancel" in body["allowed"]
    assert (await c.get(f"/api/runs/{waiting}")).status_code == 200

    # the runtime, the run's single writer, refuses too (a delete racing a state change)
    nc = await nats.connect(platform.nats_url)
    try:
        await publish_command(nc.jetstream(), DeleteRun(actor=ANONYMOUS, run_id=waiting))

        async def rejections() -> dict[str, Any]:
            r = await c.get(f"/api/runs/{waiting}/events", params={"event_type": "command_rejected"})
            return r.json()  # type: ignore[no-any-return]

        events = await wait_until(rejections, lambda page: page.get("items"))
        assert events["items"][0]["payload"]["code"] == "invalid_run_transition"
        assert events["items"][0]["payload"]["command_type"] == "delete_run"
    finally:
        await nc.close()
    assert (await c.get(f"/api/runs/{waiting}")).json()["status"] == "waiting_approval"

    r = await c.delete(f"/api/runs/{done}")
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": True, "run_id": done, "children_deleted": 0}
    is_problem(await c.get(f"/api/runs/{done}"), 404, "not_found")
    is_problem(await c.get(f"/api/runs/{done}/events"), 404, "not_found")
    is_problem(await c.delete(f"/api/runs/{done}"), 404, "not_found")
    assert done not in {x["run_id"] for x in (await c.get("/api/runs", params={"procedure_id": "del_simple"})
                                              ).json()["items"]}


CHILD = simple("kid")
PARENT = {"procedure_id": "kid_parent", "version": "1", "workflow_graph": {"start_node": "call", "nodes": {
    "call": {"type": "subflow", "procedure_id": "kid", "version": "1", "input_mapping": {"n": "3"},
             "output_mapping": {"got": "n"}, "next_node": "end"},
    "end": {"type": "terminate", "outputs": {"got": "{{got}}"}}}}}


async def test_children_and_cascading_delete(platform: Platform) -> None:
    c = platform.client
    await imported(c, CHILD)
    await imported(c, PARENT)
    parent = await start_run(c, "kid_parent")
    assert (await wait_status(c, parent))["status"] == "completed"

    page = (await c.get(f"/api/runs/{parent}/children")).json()
    assert page["total"] == 1
    assert page["limit"] == 100
    assert page["offset"] == 0
    child = page["items"][0]
    assert child["parent_run_id"] == parent
    assert child["trigger_type"] == "subflow"
    assert child["root_run_id"] == parent
    assert child["status"] == "completed"
    assert (await c.get(f"/api/runs/{parent}/children", params={"status": "failed"})).json()["total"] == 0
    assert (await c.get(f"/api/runs/{parent}/children", params={"offset": 1})).json()["items"] == []
    is_problem(await c.get(f"/api/runs/{parent}/children", params={"limit": 0}), 422, "validation_failed")
    is_problem(await c.get("/api/runs/0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10/children"), 404, "not_found")

    top = {x["run_id"] for x in (await c.get("/api/runs", params={"top_level": "true", "limit": 500})).json()["items"]}
    assert parent in top
    assert child["run_id"] not in top
    kids = (await c.get("/api/runs", params={"parent_run_id": parent})).json()
    assert [x["run_id"] for x in kids["items"]] == [child["run_id"]]
    assert (await c.get("/api/runs", params={"trigger_type": "subflow", "procedure_id": "kid"})).json()["total"] == 1

    r = await c.delete(f"/api/runs/{parent}")
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": True, "run_id": parent, "children_deleted": 1}
    await gone(c, child["run_id"])


async def test_cleanup_preview_delete_and_alias(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("cl_simple"))
    await imported(c, gate("cl_gate"))
    runs = [await start_run(c, "cl_simple", {"n": i}) for i in (1, 2, -1)]
    waiting = await start_run(c, "cl_gate")
    for run_id in runs:
        await wait_status(c, run_id)
    await wait_status(c, waiting, ("waiting_approval",))
    before = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()

    r = await c.post("/api/runs/cleanup", json={"before": before, "procedure_id": "cl_simple"})
    assert r.status_code == 200, r.text
    preview = r.json()
    assert preview["dry_run"] is True
    assert preview["matched"] == 3
    assert sorted(preview["sample_run_ids"]) == sorted(runs)
    assert preview["statuses"] == ["completed", "failed", "canceled"]
    assert preview["before"].endswith("Z")
    r = await c.post("/api/runs/cleanup", json={"before": before, "statuses": ["failed"], "dry_run": True,
                                                "procedure_id": "cl_simple"})
    assert r.json()["matched"] == 1
    assert r.json()["sample_run_ids"] == [runs[2]]
    gate_preview = (await c.post("/api/runs/cleanup", json={"before": before, "procedure_id": "cl_gate"})).json()
    assert gate_preview["matched"] == 0  # never a non-terminal run
    assert (await c.get(f"/api/runs/{runs[0]}")).status_code == 200  # a preview deletes nothing

    body = is_problem(await c.post("/api/runs/cleanup", json={}), 422, "validation_failed")
    assert "before" in body["errors"]
    body = is_problem(await c.post("/api/runs/cleanup", json={"before": "2025-01-01T00:00:00"}), 422,
                      "validation_failed")
    assert "before" in body["errors"]
    body = is_problem(await c.post("/api/runs/cleanup", json={"before": before, "statuses": ["running"]}), 422,
                      "validation_failed")
    assert "statuses" in body["errors"]
    body = is_problem(await c.post("/api/runs/cleanup", json={"before": before, "limit": 10_001}), 422,
                      "validation_failed")
    assert "limit" in body["errors"]

    r = await c.post("/api/runs/cleanup", json={"before": before, "procedure_id": "cl_simple", "dry_run": False,
                                                "statuses": ["completed"], "limit": 1})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["dry_run"] is False
    assert accepted["matched"] == 2
    assert accepted["accepted"] == 1
    assert isinstance(accepted["cleanup_id"], str)
    await gone(c, runs[0])
    assert (await c.get(f"/api/runs/{runs[1]}")).status_code == 200  # beyond the limit

    r = await c.delete("/api/runs/cleanup/history", params={"before": before, "status": "completed,failed"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed,failed"
    assert r.json()["before"] == before
    assert r.json()["deleted_count"] >= 2
    await gone(c, runs[1])
    await gone(c, runs[2])
    assert (await c.get(f"/api/runs/{waiting}")).json()["status"] == "waiting_approval"
    is_problem(await c.delete("/api/runs/cleanup/history"), 422, "validation_failed")
    is_problem(await c.delete("/api/runs/cleanup/history", params={"before": "now"}), 422, "validation_failed")


async def test_checkpoints_list_and_detail(platform: Platform) -> None:
    c = platform.client
    await imported(c, simple("cp_simple"))
    run_id = await start_run(c, "cp_simple", {"n": 5, "api_key": "sk-very-secret-value"})
    assert (await wait_status(c, run_id))["status"] == "completed"

    page = (await c.get(f"/api/runs/{run_id}/checkpoints")).json()
    assert set(page) == {"items", "total", "limit", "offset"}
    assert page["total"] >= 2
    assert len(page["items"]) == page["total"]
    first = page["items"][0]
    assert set(first) == {"checkpoint_id", "thread_id", "checkpoint_ns", "parent_checkpoint_id", "step", "source",
                          "node_ids", "writes", "created_at"}
    assert first["thread_id"] == run_id
    assert first["checkpoint_ns"] == ""
    steps = [x["step"] for x in page["items"]]
    assert steps == sorted(steps, reverse=True)  # newest first
    assert page["items"][-1]["parent_checkpoint_id"] is None
    assert first["parent_checkpoint_id"] == page["items"][1]["checkpoint_id"]
    assert first["created_at"].endswith("Z")
    second = (await c.get(f"/api/runs/{run_id}/checkpoints", params={"limit": 1, "offset": 1})).json()
    assert [x["checkpoint_id"] for x in second["items"]] == [page["items"][1]["checkpoint_id"]]
    assert second["total"] == page["total"]
    assert (await c.get(f"/api/runs/{run_id}/checkpoints", params={"checkpoint_ns": "nope"})).json()["total"] == 0

    r = await c.get(f"/api/runs/{run_id}/checkpoints/{first['checkpoint_id']}")
    assert r.status_code == 200, r.text
    detail = r.json()
    assert set(detail) == {"checkpoint_id", "thread_id", "checkpoint_ns", "parent_checkpoint_id", "created_at",
                           "step", "source", "channel_values", "channel_versions", "versions_seen",
                           "pending_writes", "metadata", "truncated_paths"}
    assert detail["checkpoint_id"] == first["checkpoint_id"]
    assert detail["parent_checkpoint_id"] == first["parent_checkpoint_id"]
    assert detail["truncated_paths"] == []
    assert "sk-very-secret-value" not in r.text  # never in an answer (api.md §1.7)
    small = (await c.get(f"/api/runs/{run_id}/checkpoints/{first['checkpoint_id']}",
                         params={"max_value_bytes": 1})).json()
    assert small["truncated_paths"]
    path = small["truncated_paths"][0]
    assert path.startswith(("channel_values.", "pending_writes."))
    if path.startswith("channel_values."):
        marker = small["channel_values"][path.split(".", 1)[1]]
        assert marker["_truncated"] is True
        assert len(marker["sha256"]) == 64

    is_problem(await c.get(f"/api/runs/{run_id}/checkpoints/0192f7c4-0000-7000-8000-000000000000"), 404,
               "not_found")
    is_problem(await c.get("/api/runs/0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10/checkpoints"), 404, "not_found")
    body = is_problem(await c.get(f"/api/runs/{run_id}/checkpoints/{first['checkpoint_id']}",
                                  params={"max_value_bytes": 0}), 422, "validation_failed")
    assert "query.max_value_bytes" in body["errors"]
