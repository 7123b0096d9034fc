"""Parallel branches by wall-clock time, end to end with a real HTTP agent (ckp.md §3.8 step 3, §3.15): the branch
that finishes first wins ``any`` while the sibling's agent call is still unanswered, and that call is aborted (its
lease released at once); a ``terminate`` in one branch ends the run without waiting for a sibling's call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import Platform, events_of, platform_of, start_document, wait_status, wait_until
from tests.scripted_agent import AgentFailure, ScriptedAgent, serving

pytestmark = pytest.mark.integration


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


def race(procedure_id: str, quick_end: dict[str, Any], wait_strategy: str = "any") -> dict[str, Any]:
    return {"procedure_id": procedure_id, "version": "1", "workflow_graph": {"start_node": "fan", "nodes": {
        "fan": {"type": "parallel", "wait_strategy": wait_strategy, "next_node": "join", "branches": [
            {"branch_id": "slow", "start_node": "call"}, {"branch_id": "quick", "start_node": "q1"}]},
        "call": {"type": "sequence", "agent": "RACE", "next_node": "join", "steps": [
            {"step_id": "wait", "action": "slow", "output_variable": "slow_out"}]},
        "q1": {"type": "sequence", "next_node": "q2", "steps": [
            {"step_id": "s1", "action": "set_variable", "variable": "q", "value": 1}]},
        "q2": {"type": "sequence", "next_node": "q3", "steps": [
            {"step_id": "s2", "action": "set_variable", "variable": "q", "value": 2}]},
        "q3": quick_end,
        "join": {"type": "terminate", "outputs": {"q": "{{q}}", "slow": "{{slow_out}}",
                                                  "winner": "{{parallel_results.winner}}"}}}}}


class Blocked:
    """The slow action: answers only when released (or after 30 s)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, body: dict[str, Any]) -> Any:
        self.calls += 1
        await asyncio.wait_for(self.release.wait(), 30)
        return "late"


async def registered(c: httpx.AsyncClient, agent: ScriptedAgent, slots: int = 1) -> None:
    r = await c.post("/api/agents", json={"agent_id": "racer", "name": "racer", "channel": "race",
                                          "base_url": agent.base_url, "concurrency_limit": slots,
                                          "capabilities": list(agent.handlers)})
    assert r.status_code == 201, r.text  # registered: a dispatch syncs the runtime's registry before it looks


async def released(c: httpx.AsyncClient, run_id: str) -> None:
    """The run's leases are gone. A call canceled with its branch releases its lease in the background (the run's
    end does not wait for the delete), so the list is read until it is empty, for a few seconds at most."""
    async def leases() -> list[Any]:
        items: list[Any] = (await c.get("/api/leases", params={"run_id": run_id})).json()["items"]
        return items
    await wait_until(leases, lambda items: items == [], timeout=10)


async def test_any_winner_is_decided_while_the_losing_agent_call_is_in_flight(platform: Platform) -> None:
    c = platform.client
    blocked = Blocked()
    agent = ScriptedAgent({"slow": blocked, "ping": lambda body: "pong"})
    async with serving(agent):
        await registered(c, agent)
        doc = race("race_any", {"type": "sequence", "next_node": "join", "steps": [
            {"step_id": "s3", "action": "set_variable", "variable": "q", "value": 3}]})
        # the quick branch pauses first, so the slow call is surely on the wire when the quick branch wins (its
        # internal steps alone may finish before the other branch's agent call goes out)
        doc["workflow_graph"]["nodes"]["q1"]["steps"].insert(0, {"step_id": "pause", "action": "wait",
                                                                 "duration_ms": 1000})
        run_id = await start_document(c, doc)
        run = await wait_status(c, run_id)
        # decided while the slow call was still unanswered
        assert not blocked.release.is_set()
        assert blocked.calls == 1
        assert run["status"] == "completed", run["error"]
        assert run["output_vars"] == {"q": 3, "slow": None, "winner": "quick"}
        events = await events_of(c, run_id)
        branches = {e["payload"]["branch_id"]: e["payload"]["status"] for e in events
                    if e["event_type"] == "parallel_branch_completed"}
        assert branches == {"quick": "completed", "slow": "canceled"}
        assert not [e for e in events if e["event_type"] == "step_completed" and e.get("step_id") == "wait"]
        # the aborted call released its lease: the agent's only slot is free for the next run
        await released(c, run_id)
        ping = {"procedure_id": "race_ping", "version": "1", "workflow_graph": {"start_node": "p", "nodes": {
            "p": {"type": "sequence", "agent": "RACE", "next_node": "end", "steps": [
                {"step_id": "ping", "action": "ping", "output_variable": "pong"}]},
            "end": {"type": "terminate", "outputs": {"pong": "{{pong}}"}}}}}
        after = await wait_status(c, await start_document(c, ping), timeout=15)
        assert after["status"] == "completed", after["error"]
        assert after["output_vars"] == {"pong": "pong"}
        assert not blocked.release.is_set()
        blocked.release.set()


async def test_terminate_in_a_branch_does_not_wait_for_the_sibling_call(platform: Platform) -> None:
    c = platform.client
    blocked = Blocked()
    agent = ScriptedAgent({"slow": blocked})
    async with serving(agent):
        await registered(c, agent)
        run_id = await start_document(c, race("race_terminate", {"type": "terminate", "status": "failed",
                                                        "outputs": {"ended_by": "quick"}}, wait_strategy="all"))
        run = await wait_status(c, run_id)
        assert not blocked.release.is_set()
        assert run["status"] == "failed"
        assert run["error"]["code"] == "terminated_failed"
        assert run["output_vars"] == {"ended_by": "quick"}
        await released(c, run_id)
        blocked.release.set()


async def test_cancel_aborts_the_calls_in_flight_in_every_branch(platform: Platform) -> None:
    """§7.10 with concurrent branches: both branches' calls are in flight; a cancel ends the run without waiting
    for either, and both leases are released."""
    c = platform.client
    blocked = Blocked()
    agent = ScriptedAgent({"slow": blocked})
    doc = race("race_cancel", {"type": "sequence", "agent": "RACE", "next_node": "join", "steps": [
        {"step_id": "wait_too", "action": "slow", "output_variable": "also"}]}, wait_strategy="all")
    doc["workflow_graph"]["nodes"]["q1"] = doc["workflow_graph"]["nodes"]["q3"]  # the quick branch calls at once
    async with serving(agent):
        await registered(c, agent, slots=2)
        run_id = await start_document(c, doc)
        for _ in range(200):
            if blocked.calls == 2:
                break
            await asyncio.sleep(0.05)
        assert blocked.calls == 2
        assert len((await c.get("/api/leases", params={"run_id": run_id})).json()["items"]) == 2
        r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "operator"})
        assert r.status_code == 202, r.text
        run = await wait_status(c, run_id)
        assert not blocked.release.is_set()
        assert run["status"] == "canceled"
        await released(c, run_id)
        events = await events_of(c, run_id)
        assert not [e for e in events if e["event_type"] == "step_completed"]
        blocked.release.set()


async def test_a_branch_that_reaches_its_join_while_a_failed_sibling_is_recorded_is_joined(
        platform: Platform) -> None:
    """``all`` + ``branch_failure: continue``: ``bad`` fails while ``good``'s last node (an agent call) is in
    flight, and that call answers after ``bad`` ended. The next super-step runs the parallel node (which appends
    ``parallel_branch_completed`` of ``bad`` to the event store) and ``good``'s join together: ``good`` ends during
    that append. Its end is not lost: the run completes (it stayed ``running`` for ever, with no error)."""
    c = platform.client
    asked = asyncio.Event()

    async def answer(body: dict[str, Any]) -> Any:
        asked.set()
        await asyncio.sleep(1)  # bad's failure is recorded meanwhile (its branch ends)
        return "ok"

    async def fail(body: dict[str, Any]) -> Any:
        await asyncio.wait_for(asked.wait(), 30)  # good's last call is in flight
        raise AgentFailure("broken", retryable=False)

    agent = ScriptedAgent({"answer": answer, "fail": fail})
    doc = {"procedure_id": "race_join", "version": "1", "workflow_graph": {"start_node": "fan", "nodes": {
        "fan": {"type": "parallel", "wait_strategy": "all", "branch_failure": "continue", "next_node": "join",
                "branches": [{"branch_id": "good", "start_node": "g1"}, {"branch_id": "bad", "start_node": "b1"}]},
        "g1": {"type": "sequence", "next_node": "g2", "steps": [
            {"step_id": "prepare", "action": "set_variable", "variable": "prepared", "value": True}]},
        "g2": {"type": "sequence", "agent": "RACE", "next_node": "join", "steps": [
            {"step_id": "ask", "action": "answer", "output_variable": "answer"}]},
        "b1": {"type": "sequence", "agent": "RACE", "next_node": "join", "steps": [
            {"step_id": "break", "action": "fail", "output_variable": "never"}]},
        "join": {"type": "terminate", "outputs": {"answer": "{{answer}}",
                                                  "bad": "{{parallel_results.branches.bad.status}}"}}}}}
    async with serving(agent):
        await registered(c, agent, slots=2)
        run_id = await start_document(c, doc)
        run = await wait_status(c, run_id, timeout=30)
        assert run["status"] == "completed", run["error"]
        assert run["output_vars"] == {"answer": "ok", "bad": "failed"}
        events = await events_of(c, run_id)
        assert [(e["payload"]["branch_id"], e["payload"]["status"]) for e in events
                if e["event_type"] == "parallel_branch_completed"] == [("bad", "failed"), ("good", "completed")]
