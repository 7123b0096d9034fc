"""Subflows run as child runs (ckp.md §3.9): own run id, the parent waits, inputs mapped in, outputs back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import Platform, platform_of
from tests.helpers import events_of, start_run, wait_status

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
