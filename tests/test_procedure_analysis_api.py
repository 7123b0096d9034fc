"""api.md §4.2/§4.6: validate, graph, explain and diff through the gateway (pure ckp-core, no command)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import Platform, example, platform_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        yield p


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=platform.base_url, timeout=30) as c:
        yield c


async def imported(c: httpx.AsyncClient, doc: dict[str, Any]) -> None:
    r = await c.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code == 201, r.text


async def test_validate_reports_diagnostics_and_summary_without_storing(client: httpx.AsyncClient) -> None:
    doc = example("multi_agent_invoice.ckp.json")
    r = await client.post("/api/procedures/validate", json={"ckp_json": doc})
    assert r.status_code == 200
    body = r.json()
    assert body["valid"] is True
    assert body["procedure_id"] == doc["procedure_id"]
    assert body["summary"]["nodes"] == len(doc["workflow_graph"]["nodes"])
    assert body["summary"]["external_calls"] == 33
    assert {d["severity"] for d in body["diagnostics"]} <= {"warning", "info"}
    stored = await client.get(f"/api/procedures/{doc['procedure_id']}/{doc['version']}")
    assert stored.status_code == 404


async def test_validate_of_an_invalid_document_is_200_with_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/procedures/validate", json={"ckp_json": example("rejected/unknown_node_type_hil.json")})
    assert r.status_code == 200
    body = r.json()
    assert body["valid"] is False
    assert [(d["code"], d["path"]) for d in body["diagnostics"]] == [
        ("unknown_node_type", "/workflow_graph/nodes/gate/type")]
    bad = await client.post("/api/procedures/validate", json={"ckp_json": [1]})
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")


async def test_validate_sees_stored_subflow_targets(client: httpx.AsyncClient) -> None:
    child = {"procedure_id": "child_flow", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
        "s": {"type": "subflow", "procedure_id": "parent_flow", "next_node": "e"}, "e": {"type": "terminate"}}}}
    await imported(client, child)
    await client.patch("/api/procedures/child_flow/1/status", json={"status": "active"})
    parent = {"procedure_id": "parent_flow", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
        "s": {"type": "subflow", "procedure_id": "child_flow", "version": "1", "next_node": "e"},
        "x": {"type": "subflow", "procedure_id": "never_imported", "next_node": "e"},
        "e": {"type": "terminate"}}}, }
    r = await client.post("/api/procedures/validate", json={"ckp_json": parent})
    found = {(d["code"], d["path"]) for d in r.json()["diagnostics"]}
    assert ("subflow_recursion", "/workflow_graph/nodes/s/procedure_id") in found
    assert ("subflow_not_found", "/workflow_graph/nodes/x/procedure_id") in found
    assert r.json()["valid"] is False


async def test_graph_has_every_node_and_edge_with_positions(client: httpx.AsyncClient) -> None:
    doc = example("product_enrichment_pipeline.ckp.json")
    await imported(client, doc)
    r = await client.get(f"/api/procedures/{doc['procedure_id']}/latest/graph")
    assert r.status_code == 200
    graph = r.json()
    assert {n["id"] for n in graph["nodes"]} == set(doc["workflow_graph"]["nodes"])
    assert all({"x", "y"} <= set(n["position"]) for n in graph["nodes"])
    assert {e["kind"] for e in graph["edges"]} >= {"next", "branch", "approve", "reject", "timeout"}
    missing = await client.get(f"/api/procedures/{doc['procedure_id']}/9.9.9/graph")
    assert missing.status_code == 404


async def test_explain_stored_and_unsaved_edit(client: httpx.AsyncClient) -> None:
    doc = example("internal_variables.ckp.json")
    await imported(client, doc)
    path = f"/api/procedures/{doc['procedure_id']}/{doc['version']}/explain"
    r = await client.post(path, json={"input_vars": {"post_id": 1}})
    assert r.status_code == 200
    body = r.json()
    assert [step["node_id"] for step in body["route_trace"]][:2] == ["fetch_data", "check_response"]
    assert body["variables"]["provided"] == ["post_id"]
    edited = copy.deepcopy(doc)
    edited["workflow_graph"]["nodes"]["fetch_data"]["next_node"] = "nowhere"
    bad = await client.post(path, json={"ckp_json": edited})
    assert bad.status_code == 422
    assert bad.json()["code"] == "compile_failed"
    assert any(d["code"] == "unknown_target" for d in bad.json()["diagnostics"])
    no_body = await client.post(path)
    assert no_body.status_code == 200


async def test_diff_between_versions(client: httpx.AsyncClient) -> None:
    v1 = example("minimal_greeting.ckp.json")
    v1 = {**v1, "procedure_id": "greeting_diff", "version": "1.0.0"}
    v2 = copy.deepcopy(v1)
    v2["version"] = "2.0.0"
    start = v2["workflow_graph"]["start_node"]
    v2["workflow_graph"]["nodes"][start]["description"] = "changed"
    await imported(client, v1)
    await imported(client, v2)
    r = await client.get("/api/procedures/greeting_diff/diff", params={"from": "1.0.0", "to": "latest"})
    assert r.status_code == 200
    body = r.json()
    assert (body["from"], body["to"], body["identical"]) == ("1.0.0", "2.0.0", False)
    assert body["summary"]["nodes_changed"] == [start]
    assert {"op": "replace", "path": "/version", "from_value": "1.0.0", "value": "2.0.0"} in body["changes"]
    unified = await client.get("/api/procedures/greeting_diff/diff",
                               params={"from": "1.0.0", "to": "2.0.0", "format": "unified"})
    assert unified.json()["changes"] == []
    lines = unified.json()["unified"].splitlines()
    assert any(line.startswith("-") and '"1.0.0"' in line for line in lines)
    assert any(line.startswith("+") and '"2.0.0"' in line for line in lines)
    missing = await client.get("/api/procedures/greeting_diff/diff", params={"from": "1.0.0"})
    assert missing.status_code == 422


async def test_import_refuses_a_subflow_cycle_through_stored_procedures(client: httpx.AsyncClient) -> None:
    b = {"procedure_id": "cyc_b", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
        "s": {"type": "subflow", "procedure_id": "cyc_a", "next_node": "e"}, "e": {"type": "terminate"}}}}
    await imported(client, b)
    await client.patch("/api/procedures/cyc_b/1/status", json={"status": "active"})
    a = {"procedure_id": "cyc_a", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
        "s": {"type": "subflow", "procedure_id": "cyc_b", "next_node": "e"}, "e": {"type": "terminate"}}}}
    r = await client.post("/api/procedures", json={"ckp_json": a})
    assert r.status_code == 422
    assert r.json()["code"] == "compile_failed"
    [cycle] = [d for d in r.json()["diagnostics"] if d["code"] == "subflow_recursion"]
    assert cycle["path"] == "/workflow_graph/nodes/s/procedure_id"
    assert "cyc_a -> cyc_b -> cyc_a" in cycle["message"]
