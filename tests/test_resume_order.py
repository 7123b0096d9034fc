"""A resumed run first records what resumed it (queued), then continues (running): ckp.md §7.1 and the worked
example §10.3 (approval_decision_received, then execution_resumed, then the approval node completes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import Platform, events_of, platform_of, start_document, wait_status

pytestmark = pytest.mark.integration


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


REFUND = {
    "procedure_id": "refund_review", "version": "1.0.0",
    "variables_schema": {"refund_id": {"type": "string", "required": True},
                         "amount": {"type": "number", "required": True}},
    "workflow_graph": {"start_node": "review", "nodes": {
        "review": {"type": "human_approval", "decision_type": "select_option",
                   "prompt": "Refund {{refund_id}} of {{amount}} EUR: how should it be paid?",
                   "options": ["card", "bank_transfer", "deny"], "option_routes": {"deny": "denied"},
                   "context_data": {"amount": "{{amount}}"}, "on_approve": "done", "on_reject": "denied"},
        "done": {"type": "terminate", "outputs": {"method": "{{approval.review.decision}}"}},
        "denied": {"type": "terminate", "status": "failed",
                   "outputs": {"reason": "{{approval.review.decision}}"}}}},
}


async def test_approval_decision_is_recorded_before_execution_resumes(platform: Platform) -> None:
    c = platform.client
    run_id = await start_document(c, REFUND, {"refund_id": "R-7", "amount": 120})
    approvals: list[dict[str, Any]] = []
    for _ in range(200):
        approvals = (await c.get("/api/approvals", params={"run_id": run_id})).json()["items"]
        if approvals:
            break
        await asyncio.sleep(0.05)
    [approval] = approvals
    assert approval["prompt"] == "Refund R-7 of 120 EUR: how should it be paid?"
    assert approval["context_data"] == {"amount": 120}
    r = await c.post(f"/api/approvals/{approval['approval_id']}/decision", json={"decision": "card"})
    assert r.status_code == 200, r.text
    run = await wait_status(c, run_id)
    assert run["status"] == "completed"
    assert run["output_vars"] == {"method": "card"}
    types = [e["event_type"] for e in await events_of(c, run_id)]
    i = types.index("approval_decision_received")
    assert types[i + 1:i + 3] == ["execution_resumed", "node_completed"]
    assert types.count("approval_decision_received") == 1
    assert types[:5] == ["run_created", "execution_started", "node_started", "approval_requested", "node_paused"]


async def test_retry_asks_again_for_an_approval_canceled_when_the_run_failed(platform: Platform) -> None:
    from tests.helpers import register_agent
    from tests.scripted_agent import AgentFailure, ScriptedAgent, serving

    c = platform.client
    calls = {"n": 0}

    def flaky(body: dict[str, Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise AgentFailure("down", "down")
        return "ok"

    doc = {"procedure_id": "gate_and_work", "version": "1", "workflow_graph": {"start_node": "fan", "nodes": {
        "fan": {"type": "parallel", "branch_failure": "fail", "next_node": "z", "branches": [
            {"branch_id": "gate", "start_node": "g"}, {"branch_id": "work", "start_node": "w"}]},
        "g": {"type": "human_approval", "on_approve": "z", "on_reject": "z"},
        "w": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "s", "action": "flaky"}]},
        "z": {"type": "terminate", "outputs": {"decision": "{{approval.g.decision}}"}}}}}
    agent = ScriptedAgent({"flaky": flaky})
    async with serving(agent):
        await register_agent(c, agent, "api")
        run_id = await start_document(c, doc)
        failed = await wait_status(c, run_id)
        assert failed["status"] == "failed"
        for _ in range(100):
            first = (await c.get("/api/approvals", params={"run_id": run_id})).json()["items"]
            if first and first[0]["status"] == "canceled":
                break
            await asyncio.sleep(0.05)
        assert [a["status"] for a in first] == ["canceled"]
        assert (await c.post(f"/api/runs/{run_id}/retry", json={})).status_code == 200
        fresh: list[dict[str, Any]] = []
        for _ in range(200):
            fresh = [a for a in (await c.get("/api/approvals", params={"run_id": run_id})).json()["items"]
                     if a["status"] == "pending"]
            if fresh:
                break
            await asyncio.sleep(0.05)
        assert len(fresh) == 1, " ".join(f"{e['event_type']}:{e['node_id']}" for e in await events_of(c, run_id))
        assert fresh[0]["approval_id"] != first[0]["approval_id"]
        r = await c.post(f"/api/approvals/{fresh[0]['approval_id']}/decision", json={"decision": "approved"})
        assert r.status_code == 200, r.text
        done = await wait_status(c, run_id)
    assert done["status"] == "completed", done["error"]
    assert done["output_vars"] == {"decision": "approved"}
