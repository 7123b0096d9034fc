"""Subflows run as child runs (ckp.md §3.9), end to end on the real platform: own run id, the parent waits, inputs
mapped in and outputs back (with ``inherit_context``), version pinning and ``latest``, ``on_failure`` (fail the
parent, continue, retry), the depth bound, dry runs, and cancellation of children with their parent or branch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import Platform, events_of, import_procedure, platform_of, start_run, wait_event, wait_status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        yield p


CHILD = {"procedure_id": "doubler", "version": "1", "variables_schema": {"n": {"type": "number", "required": True}},
         "workflow_graph": {"start_node": "calc", "nodes": {
             "calc": {"type": "processing", "next_node": "check", "operations": [
                 {"action": "calculate", "expression": "n * 2", "output_variable": "double"}]},
             "check": {"type": "logic", "rules": [{"condition": "n < 0", "next_node": "bad"}],
                       "default_next_node": "done"},
             "bad": {"type": "terminate", "status": "failed", "outputs": {"why": "negative"}},
             "done": {"type": "terminate", "outputs": {"double": "{{double}}"}}}}}


def parent(pid: str, on_failure: str = "fail_parent", mapping: Any = None) -> dict[str, Any]:
    return {"procedure_id": pid, "version": "1", "variables_schema": {"x": {"type": "number"}},
            "workflow_graph": {"start_node": "call", "nodes": {
                "call": {"type": "subflow", "procedure_id": "doubler", "version": "1",
                         "input_mapping": mapping if mapping is not None else {"n": "{{x}}"},
                         "output_mapping": {"result": "double"}, "on_failure": on_failure, "next_node": "end"},
                "end": {"type": "terminate", "outputs": {"result": "{{result}}"}}}}}


@pytest.fixture(scope="module")
async def imported(platform: Platform) -> None:
    c = platform.client
    for doc in (CHILD, parent("p_ok"), parent("p_continue", on_failure="continue"),
                parent("p_bad_inputs", mapping={"n": "not a number"})):
        r = await c.post("/api/procedures", json={"ckp_json": doc})
        assert r.status_code == 201, r.text


@pytest.mark.usefixtures("imported")
async def test_child_run_is_created_awaited_and_mapped_back(platform: Platform) -> None:
    c = platform.client
    run_id = await start_run(c, "p_ok", {"x": 21})
    run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"result": 42}
    parent_events = await events_of(c, run_id)
    [started] = [e for e in parent_events if e["event_type"] == "subflow_started"]
    child_id = started["payload"]["child_run_id"]
    child = await wait_status(c, child_id)
    assert (child["parent_run_id"], child["root_run_id"], child["trigger_type"]) == (run_id, run_id, "subflow")
    assert child["input_vars"] == {"n": 21}
    types = [e["event_type"] for e in parent_events]
    assert types.index("subflow_started") < types.index("execution_resumed") < types.index("subflow_completed")


@pytest.mark.usefixtures("imported")
async def test_failed_child_fails_the_parent_or_continues(platform: Platform) -> None:
    c = platform.client
    failed = await wait_status(c, await start_run(c, "p_ok", {"x": -1}))
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "subflow_failed"
    continued = await wait_status(c, await start_run(c, "p_continue", {"x": -1}))
    assert continued["status"] == "completed"
    assert continued["output_vars"] == {"result": None}


@pytest.mark.usefixtures("imported")
async def test_invalid_child_inputs_fail_the_subflow_node(platform: Platform) -> None:
    c = platform.client
    run = await wait_status(c, await start_run(c, "p_bad_inputs", {"x": 1}))
    assert run["status"] == "failed"
    assert run["error"]["code"] == "subflow_input_invalid"


# -- versions, mapping with inherit_context, retries, depth, cancellation, dry runs (ids au_*) -----------------

async def imp(c: httpx.AsyncClient, document: dict[str, Any], activate: bool = False) -> None:
    await import_procedure(c, document)
    if activate:
        r = await c.patch(f"/api/procedures/{document['procedure_id']}/{document['version']}/status",
                          json={"status": "active"})
        assert r.status_code == 200, r.text


async def run(c: httpx.AsyncClient, pid: str, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    r = await c.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1", "input_vars": inputs or {}})
    assert r.status_code == 201, r.text
    return await wait_status(c, str(r.json()["run_id"]), timeout=60)


def proc(pid: str, nodes: dict[str, Any], start: str, version: str = "1", **extra: Any) -> dict[str, Any]:
    return {"procedure_id": pid, "version": version, **extra, "workflow_graph": {"start_node": start,
                                                                                   "nodes": nodes}}


def versioned_child(version: str) -> dict[str, Any]:
    return proc("au_sv", {"t": {"type": "terminate", "outputs": {"v": version}}}, "t", version=version)


def caller(pid: str, version: str | None) -> dict[str, Any]:
    call: dict[str, Any] = {"type": "subflow", "procedure_id": "au_sv", "next_node": "end"}
    if version is not None:
        call["version"] = version
    return proc(pid, {"call": call, "end": {"type": "terminate", "outputs": {"got": "{{subflow_output.v}}"}}},
                "call")


async def test_version_pinning_and_latest_resolve_to_the_newest_active_version(platform: Platform) -> None:
    c = platform.client
    await imp(c, versioned_child("1"), activate=True)
    await imp(c, versioned_child("2"), activate=True)
    await imp(c, versioned_child("3"))  # draft: runnable when pinned, never chosen as latest
    for pid, version in (("au_pin3", "3"), ("au_latest", "latest"), ("au_omitted", None)):
        await imp(c, caller(pid, version))
    pinned = await run(c, "au_pin3")
    assert pinned["status"] == "completed", pinned["error"]
    assert pinned["output_vars"] == {"got": "3"}
    for pid in ("au_latest", "au_omitted"):
        latest = await run(c, pid)
        assert latest["status"] == "completed", latest["error"]
        assert latest["output_vars"] == {"got": "2"}
        [started] = [e for e in await events_of(c, latest["run_id"]) if e["event_type"] == "subflow_started"]
        assert started["payload"]["version"] == "2"


async def test_missing_version_is_subflow_not_found(platform: Platform) -> None:
    c = platform.client
    await imp(c, proc("au_nf", {"call": {"type": "subflow", "procedure_id": "au_nowhere", "next_node": "end"},
                                "end": {"type": "terminate"}}, "call"))
    failed = await run(c, "au_nf")
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "subflow_not_found"


MAPPING_CHILD = proc("au_mchild", {
    "calc": {"type": "processing", "next_node": "done", "operations": [
        {"action": "calculate", "expression": "order.total * rate", "output_variable": "internal"},
        {"action": "set_variable", "variable": "seen_extra", "value": "{{extra}}"}]},
    "done": {"type": "terminate", "outputs": {"total": "{{internal}}", "nested": {"k": "{{label}}"}}}}, "calc",
    variables_schema={"order": {"type": "object", "required": True}, "rate": {"type": "number", "required": True},
                      "label": {"type": "string"}})


async def test_input_and_output_mapping_with_inherit_context(platform: Platform) -> None:
    c = platform.client
    await imp(c, MAPPING_CHILD)
    await imp(c, proc("au_mparent", {
        "prep": {"type": "processing", "next_node": "call", "operations": [
            {"action": "set_variable", "variable": "extra", "value": "from parent"}]},
        "call": {"type": "subflow", "procedure_id": "au_mchild", "version": "1", "inherit_context": True,
                 "input_mapping": {"order": "my_order", "rate": "{{factor}}", "label": "id-{{my_order.id}}"},
                 "output_mapping": {"total": "total", "k": "nested.k", "from_vars": "seen_extra",
                                    "absent": "no_such_key"},
                 "next_node": "end"},
        "end": {"type": "terminate", "outputs": {"total": "{{total}}", "k": "{{k}}", "from_vars": "{{from_vars}}",
                                                 "absent": "{{absent}}"}}}, "prep",
        variables_schema={"my_order": {"type": "object", "default": {"id": 7, "total": 10}},
                          "factor": {"type": "number", "default": 2}}))
    parent = await run(c, "au_mparent")
    assert parent["status"] == "completed", parent["error"]
    assert parent["output_vars"] == {"total": 20, "k": "id-7", "from_vars": "from parent", "absent": None}
    parent_events = await events_of(c, parent["run_id"])
    [started] = [e for e in parent_events if e["event_type"] == "subflow_started"]
    child = await wait_status(c, started["payload"]["child_run_id"])
    assert child["input_vars"]["order"] == {"id": 7, "total": 10}
    assert child["input_vars"]["rate"] == 2
    assert child["input_vars"]["extra"] == "from parent"
    assert "run_id" not in child["input_vars"]
    warnings = [e["payload"] for e in parent_events if e["event_type"] == "template_warning"]
    assert any(w["location"]["field"] == "/output_mapping/absent" for w in warnings), warnings


FLAKY_CHILD = proc("au_flaky", {
    "check": {"type": "logic", "rules": [{"condition": "attempt_no < 3", "next_node": "bad"}],
              "default_next_node": "ok"},
    "bad": {"type": "terminate", "status": "failed", "outputs": {"why": "early"}},
    "ok": {"type": "terminate", "outputs": {"ok": True}}}, "check",
    variables_schema={"attempt_no": {"type": "integer", "required": True}})


async def test_on_failure_retry_reruns_the_child_then_fails_the_parent(platform: Platform) -> None:
    c = platform.client
    await imp(c, FLAKY_CHILD)
    await imp(c, proc("au_retry", {
        "call": {"type": "subflow", "procedure_id": "au_flaky", "version": "1", "on_failure": "retry",
                 "max_retries": 2, "input_mapping": {"attempt_no": 1}, "next_node": "end"},
        "end": {"type": "terminate", "outputs": {"ok": "{{subflow_output.ok}}"}}}, "call"))
    failed = await run(c, "au_retry")
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "subflow_failed"
    evs = await events_of(c, failed["run_id"])
    [run_failed] = [e["payload"] for e in evs if e["event_type"] == "run_failed"]
    assert run_failed["error"]["cause"]["code"] == "terminated_failed"
    started = [e["payload"] for e in evs if e["event_type"] == "subflow_started"]
    assert [e["attempt"] for e in evs if e["event_type"] == "subflow_started"] == [1, 2, 3]
    assert len([e for e in evs if e["event_type"] == "subflow_failed"]) == 3
    children = [await wait_status(c, s["child_run_id"]) for s in started]
    assert children[0]["rerun_of"] is None
    assert children[1]["rerun_of"] == children[0]["run_id"]
    assert children[2]["rerun_of"] == children[1]["run_id"]


def chain_link(i: int, last: int) -> dict[str, Any]:
    if i == last:
        return proc(f"au_d{i}", {"t": {"type": "terminate", "outputs": {"depth": i}}}, "t")
    return proc(f"au_d{i}", {
        "call": {"type": "subflow", "procedure_id": f"au_d{i + 1}", "version": "1", "next_node": "t"},
        "t": {"type": "terminate", "outputs": {"depth": "{{subflow_output.depth}}"}}}, "call")


async def test_a_chain_of_ten_runs_completes_and_an_eleventh_is_subflow_depth_exceeded(platform: Platform) -> None:
    c = platform.client
    for i in range(10, -1, -1):
        await imp(c, chain_link(i, 10))
    ok = await run(c, "au_d1")  # au_d1 .. au_d10: ten runs
    assert ok["status"] == "completed", ok["error"]
    assert ok["output_vars"] == {"depth": 10}
    deep = await run(c, "au_d0")  # au_d0 .. au_d10 would be eleven runs
    assert deep["status"] == "failed"
    [run_failed] = [e["payload"] for e in await events_of(c, deep["run_id"]) if e["event_type"] == "run_failed"]
    err = run_failed["error"]
    codes = []
    while err is not None:
        codes.append(err["code"])
        err = err.get("cause")
    assert codes == ["subflow_failed"] * 9 + ["subflow_depth_exceeded"]


WAITING_CHILD = proc("au_waiter", {
    "ask": {"type": "human_approval", "prompt": "hold", "on_approve": "done", "on_reject": "done"},
    "done": {"type": "terminate", "outputs": {"ok": True}}}, "ask")


async def test_canceling_a_running_parent_cancels_its_waiting_child(platform: Platform) -> None:
    c = platform.client
    await imp(c, WAITING_CHILD)
    await imp(c, proc("au_cancel_parent", {
        "fan": {"type": "parallel", "next_node": "end", "branches": [
            {"branch_id": "sub", "start_node": "call"}, {"branch_id": "slow", "start_node": "nap"}]},
        "call": {"type": "subflow", "procedure_id": "au_waiter", "version": "1"},
        "nap": {"type": "processing", "operations": [{"action": "wait", "duration_ms": 30000}]},
        "end": {"type": "terminate"}}, "fan"))
    r = await c.post("/api/runs", json={"procedure_id": "au_cancel_parent", "procedure_version": "1"})
    assert r.status_code == 201, r.text
    parent_id = r.json()["run_id"]
    started = await wait_event(c, parent_id, "subflow_started")
    child_id = started["payload"]["child_run_id"]
    await wait_event(c, child_id, "approval_requested")
    r = await c.post(f"/api/runs/{parent_id}/cancel", json={"reason": "operator"})
    assert r.status_code in (200, 202), r.text
    assert (await wait_status(c, parent_id))["status"] == "canceled"
    assert (await wait_status(c, child_id))["status"] == "canceled"


async def test_a_parent_ended_by_terminate_cancels_a_child_still_waiting(platform: Platform) -> None:
    c = platform.client
    await imp(c, proc("au_term_parent", {
        "fan": {"type": "parallel", "next_node": "end", "branches": [
            {"branch_id": "sub", "start_node": "call"}, {"branch_id": "quick", "start_node": "nap"}]},
        "call": {"type": "subflow", "procedure_id": "au_waiter", "version": "1"},
        "nap": {"type": "processing", "next_node": "stop", "operations": [{"action": "wait", "duration_ms": 300}]},
        "stop": {"type": "terminate", "outputs": {"by": "quick"}},
        "end": {"type": "terminate"}}, "fan"))
    if not (await c.get("/api/procedures/au_waiter/1")).is_success:
        await imp(c, WAITING_CHILD)
    parent = await run(c, "au_term_parent")
    assert parent["status"] == "completed", parent["error"]
    assert parent["output_vars"] == {"by": "quick"}
    started = [e for e in await events_of(c, parent["run_id"]) if e["event_type"] == "subflow_started"]
    child = await wait_status(c, started[0]["payload"]["child_run_id"])
    assert child["status"] == "canceled"


async def test_a_child_of_a_branch_canceled_by_an_any_winner_is_canceled_while_the_parent_goes_on(
        platform: Platform) -> None:
    c = platform.client
    if not (await c.get("/api/procedures/au_waiter/1")).is_success:
        await imp(c, WAITING_CHILD)
    await imp(c, proc("au_any_parent", {
        "fan": {"type": "parallel", "wait_strategy": "any", "next_node": "hold", "branches": [
            {"branch_id": "sub", "start_node": "call"}, {"branch_id": "quick", "start_node": "nap"}]},
        "call": {"type": "subflow", "procedure_id": "au_waiter", "version": "1"},
        "nap": {"type": "processing", "operations": [{"action": "wait", "duration_ms": 300}]},
        "hold": {"type": "human_approval", "prompt": "parent waits", "on_approve": "end", "on_reject": "end"},
        "end": {"type": "terminate", "outputs": {"winner": "{{parallel_results.winner}}"}}}, "fan"))
    r = await c.post("/api/runs", json={"procedure_id": "au_any_parent", "procedure_version": "1"})
    assert r.status_code == 201, r.text
    parent_id = r.json()["run_id"]
    started = await wait_event(c, parent_id, "subflow_started")
    child = await wait_status(c, started["payload"]["child_run_id"])
    assert child["status"] == "canceled"
    await wait_event(c, parent_id, "approval_requested")
    # the canceled child's end reaches the parent as a resume for a wait it no longer has: ignored
    deadline = asyncio.get_running_loop().time() + 5
    while asyncio.get_running_loop().time() < deadline:
        assert (await c.get(f"/api/runs/{parent_id}")).json()["status"] == "waiting_approval"
        await asyncio.sleep(0.2)
    types = [e["event_type"] for e in await events_of(c, parent_id)]
    assert types.count("execution_resumed") == 0, types
    await c.post(f"/api/runs/{parent_id}/cancel", json={"reason": "test done"})
    assert (await wait_status(c, parent_id))["status"] == "canceled"


async def test_a_parent_waiting_on_an_approval_and_a_child_reads_waiting_approval(platform: Platform) -> None:
    c = platform.client
    if not (await c.get("/api/procedures/au_waiter/1")).is_success:
        await imp(c, WAITING_CHILD)
    await imp(c, proc("au_mixed_waits", {
        "fan": {"type": "parallel", "next_node": "end", "branches": [
            {"branch_id": "sub", "start_node": "call"}, {"branch_id": "ask", "start_node": "hold"}]},
        "call": {"type": "subflow", "procedure_id": "au_waiter", "version": "1"},
        "hold": {"type": "human_approval", "prompt": "parent asks", "on_approve": "end", "on_reject": "end"},
        "end": {"type": "terminate"}}, "fan"))
    r = await c.post("/api/runs", json={"procedure_id": "au_mixed_waits", "procedure_version": "1"})
    assert r.status_code == 201, r.text
    parent_id = r.json()["run_id"]
    started = await wait_event(c, parent_id, "subflow_started")
    await wait_event(c, parent_id, "approval_requested")
    deadline = asyncio.get_running_loop().time() + 30
    while (status := (await c.get(f"/api/runs/{parent_id}")).json()["status"]) not in ("waiting_approval",):
        assert status in ("created", "queued", "running"), status
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.1)
    await c.post(f"/api/runs/{parent_id}/cancel", json={"reason": "test done"})
    assert (await wait_status(c, parent_id))["status"] == "canceled"
    assert (await wait_status(c, started["payload"]["child_run_id"]))["status"] == "canceled"


async def test_child_inputs_failing_the_child_schema_list_every_field(platform: Platform) -> None:
    c = platform.client
    await imp(c, proc("au_strict", {"t": {"type": "terminate"}}, "t", variables_schema={
        "n": {"type": "integer", "required": True}, "region": {"type": "string", "required": True,
                                                              "validation": {"allowed_values": ["eu", "us"]}}}))
    await imp(c, proc("au_strict_parent", {
        "call": {"type": "subflow", "procedure_id": "au_strict", "version": "1",
                 "input_mapping": {"n": "1.5", "region": "mars"}, "next_node": "end"},
        "end": {"type": "terminate"}}, "call"))
    parent = await run(c, "au_strict_parent")
    assert parent["status"] == "failed"
    assert parent["error"]["code"] == "subflow_input_invalid"
    [failed] = [e["payload"] for e in await events_of(c, parent["run_id"]) if e["event_type"] == "run_failed"]
    assert failed["error"]["details"]["errors"] == {"input_vars.n": ["Must be an integer"],
                                                    "input_vars.region": ["Must be one of: eu, us"]}
    assert (await c.get("/api/runs", params={"procedure_id": "au_strict"})).json()["total"] == 0


async def test_a_dry_run_parent_forces_dry_run_on_its_child(platform: Platform) -> None:
    c = platform.client
    if not (await c.get("/api/procedures/au_waiter/1")).is_success:
        await imp(c, WAITING_CHILD)
    await imp(c, proc("au_dry_parent", {
        "call": {"type": "subflow", "procedure_id": "au_waiter", "version": "1", "next_node": "end"},
        "end": {"type": "terminate", "outputs": {"ok": "{{subflow_output.ok}}"}}}, "call",
        global_config={"execution_mode": "dry_run"}))
    parent = await run(c, "au_dry_parent")
    assert parent["status"] == "completed", parent["error"]
    assert parent["output_vars"] == {"ok": True}
    [started] = [e for e in await events_of(c, parent["run_id"]) if e["event_type"] == "subflow_started"]
    child_events = await events_of(c, started["payload"]["child_run_id"])
    assert [e["payload"]["execution_mode"] for e in child_events if e["event_type"] == "execution_started"] == [
        "dry_run"]
    assert [e for e in child_events if e["event_type"] == "approval_auto_resolved"]
    assert not [e for e in child_events if e["event_type"] == "approval_requested"]
