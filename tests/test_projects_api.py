"""api.md §9: projects CRUD (gateway-owned aggregate), counts from the projections, cost summary from the
runs' ``llm_usage`` events, and import into a project (§4.2)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ckp_core.events import ANONYMOUS, EventEnvelope
from langorch_infra.jetstream import JetStreamEventStore, connect
from tests.helpers import Platform, platform_of, problem, procedure_doc

pytestmark = pytest.mark.integration

PROJECT_FIELDS = {"project_id", "name", "description", "created_at", "created_by", "updated_at", "procedure_count",
                  "active_run_count"}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        yield p


async def create(c: httpx.AsyncClient, name: str, description: str | None = None) -> dict[str, Any]:
    r = await c.post("/api/projects", json={"name": name, "description": description})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"/api/projects/{r.json()['project_id']}"
    return r.json()  # type: ignore[no-any-return]


async def test_create_read_rename_and_delete(platform: Platform) -> None:
    c = platform.client
    p = await create(c, "Billing", "invoices and payments")
    assert set(p) == PROJECT_FIELDS
    assert (p["name"], p["description"], p["procedure_count"], p["active_run_count"]) == (
        "Billing", "invoices and payments", 0, 0)
    assert p["created_by"] == "anonymous"
    assert (await c.get(f"/api/projects/{p['project_id']}")).json() == p

    body = problem(await c.post("/api/projects", json={"name": "billing"}), 409, "project_exists")
    assert body["existing_project_id"] == p["project_id"]

    r = await c.patch(f"/api/projects/{p['project_id']}", json={"name": "Billing EU"})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["description"]) == ("Billing EU", "invoices and payments")
    r = await c.put(f"/api/projects/{p['project_id']}", json={"description": None})  # the PUT alias
    assert r.status_code == 200, r.text
    assert r.json()["description"] is None
    other = await create(c, "Other")
    problem(await c.patch(f"/api/projects/{other['project_id']}", json={"name": "BILLING eu"}), 409,
            "project_exists")

    r = await c.delete(f"/api/projects/{p['project_id']}")
    assert r.status_code == 204
    assert r.content == b""
    problem(await c.get(f"/api/projects/{p['project_id']}"), 404, "not_found")
    problem(await c.patch(f"/api/projects/{p['project_id']}", json={"name": "x"}), 404, "not_found")
    problem(await c.delete(f"/api/projects/{p['project_id']}"), 404, "not_found")
    # the name is free again
    await create(c, "Billing")


async def test_bad_project_bodies(platform: Platform) -> None:
    c = platform.client
    body = problem(await c.post("/api/projects", json={}), 422, "validation_failed")
    assert body["errors"] == {"name": ["This field is required"]}
    body = problem(await c.post("/api/projects", json={"name": "x", "owner": "me"}), 422, "unknown_field")
    assert body["errors"] == {"owner": ["Unknown field"]}
    body = problem(await c.post("/api/projects", json={"name": "   "}), 422, "validation_failed")
    assert list(body["errors"]) == ["name"]
    body = problem(await c.post("/api/projects", json={"name": "x" * 201}), 422, "validation_failed")
    assert list(body["errors"]) == ["name"]
    problem(await c.post("/api/projects", content=b"{nope", headers={"content-type": "application/json"}), 400,
            "malformed_json")
    p = await create(c, "Patchable")
    body = problem(await c.patch(f"/api/projects/{p['project_id']}", json={"name": None}), 422, "validation_failed")
    assert list(body["errors"]) == ["name"]


async def test_counts_import_into_project_and_not_empty(platform: Platform) -> None:
    c = platform.client
    p = await create(c, "Counted")
    pid = p["project_id"]
    r = await c.post("/api/procedures", json={"ckp_json": procedure_doc("proj_proc"), "project_id": "nope"})
    body = problem(r, 404, "not_found")
    assert body["resource"] == "project"
    for version in ("1.0.0", "2.0.0"):
        r = await c.post("/api/procedures", json={"ckp_json": procedure_doc("proj_proc", version), "project_id": pid})
        assert r.status_code == 201, r.text
        assert r.json()["project_id"] == pid
    run = await c.post("/api/runs", json={"procedure_id": "proj_proc", "procedure_version": "1.0.0"})
    assert run.status_code == 201, run.text
    assert run.json()["project_id"] == pid  # runs default to the procedure's project
    counted = (await c.get(f"/api/projects/{pid}")).json()
    assert (counted["procedure_count"], counted["active_run_count"]) == (1, 1)
    listed = (await c.get("/api/procedures", params={"project_id": pid})).json()
    assert listed["total"] == 2
    body = problem(await c.delete(f"/api/projects/{pid}"), 409, "project_not_empty")
    assert body["procedure_count"] == 1


async def test_list_search_sort_and_paging(platform: Platform) -> None:
    c = platform.client
    for name in ("zeta-search", "Alpha-search", "mid-search"):
        await create(c, name, description=f"about {name}")
    page = (await c.get("/api/projects", params={"search": "SEARCH", "sort": "name", "order": "asc"})).json()
    assert [p["name"] for p in page["items"]] == ["Alpha-search", "mid-search", "zeta-search"]
    assert page["total"] == 3
    page = (await c.get("/api/projects", params={"search": "search", "sort": "created_at", "limit": 2})).json()
    assert [p["name"] for p in page["items"]] == ["mid-search", "Alpha-search"]
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
    page = (await c.get("/api/projects", params={"search": "search", "offset": 3})).json()
    assert (page["items"], page["total"]) == ([], 3)
    page = (await c.get("/api/projects", params={"search": "about zeta"})).json()
    assert [p["name"] for p in page["items"]] == ["zeta-search"]
    for params in ({"limit": 501}, {"limit": 0}, {"offset": -1}, {"sort": "size"}, {"order": "up"}):
        body = problem(await c.get("/api/projects", params=params), 422, "validation_failed")
        assert list(body["errors"]) == [f"query.{next(iter(params))}"]


async def test_cost_summary_adds_up_llm_usage_of_runs_in_the_window(platform: Platform) -> None:
    c = platform.client
    p = await create(c, "Costly")
    pid = p["project_id"]
    empty = (await c.get(f"/api/projects/{pid}/cost-summary")).json()
    assert empty == {"project_id": pid, "period_days": 30, "run_count": 0, "total_prompt_tokens": 0,
                     "total_completion_tokens": 0, "estimated_cost_usd": 0.0, "by_model": []}
    r = await c.post("/api/procedures", json={"ckp_json": procedure_doc("cost_proc"), "project_id": pid})
    assert r.status_code == 201, r.text
    run_ids = []
    for _ in range(2):
        r = await c.post("/api/runs", json={"procedure_id": "cost_proc", "procedure_version": "1.0.0"})
        run_ids.append(r.json()["run_id"])
    usages = [(run_ids[0], "gpt-4o", 100, 20, 0.5), (run_ids[0], "gpt-4o", 50, 10, 0.25),
              (run_ids[1], "local-model", 7, 3, None)]
    nc = await connect(platform.nats_url, "test-llm-usage")
    try:
        store = JetStreamEventStore(nc.jetstream())
        position = 0
        for run_id, model, prompt, completion, cost in usages:
            head = await store.head("run", run_id)
            assert head is not None
            # the runtime will append these; the shape is ckp.md / api.md §15.5 llm_usage
            data = {"model": model, "requested_model": model, "provider_host": "llm.test", "prompt_tokens": prompt,
                    "completion_tokens": completion, "total_tokens": prompt + completion,
                    "estimated_cost_usd": cost, "usage_reported": True, "latency_ms": 5, "attempt": 1,
                    "fallback_attempt": 0}
            event = EventEnvelope(type="llm_usage", aggregate="run", aggregate_id=run_id, seq=head.seq + 1,
                                  actor=ANONYMOUS, correlation_id=run_id, data=data)
            [position] = await store.append([event], expected_position=head.position)
    finally:
        await nc.close()
    summary = (await c.get(f"/api/projects/{pid}/cost-summary", params={"period_days": 7},
                           headers={"X-LangOrch-Min-Position": str(position)})).json()
    assert summary["run_count"] == 2
    assert (summary["total_prompt_tokens"], summary["total_completion_tokens"]) == (157, 33)
    assert summary["estimated_cost_usd"] == 0.75
    assert summary["by_model"] == [
        {"model": "gpt-4o", "prompt_tokens": 150, "completion_tokens": 30, "estimated_cost_usd": 0.75},
        {"model": "local-model", "prompt_tokens": 7, "completion_tokens": 3, "estimated_cost_usd": None}]
    for bad in (0, 366):
        body = problem(await c.get(f"/api/projects/{pid}/cost-summary", params={"period_days": bad}), 422,
                       "validation_failed")
        assert list(body["errors"]) == ["query.period_days"]
    problem(await c.get("/api/projects/unknown/cost-summary"), 404, "not_found")

