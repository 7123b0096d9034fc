"""Runs that dispatch to real HTTP agents (ckp.md §4.5, §4.7, §7.4, §7.10, §7.12), end to end through the API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.agent_server import AgentBehaviour, running_agent
from tests.helpers import (
    TERMINAL,
    Platform,
    ended_after_a_retry,
    events_of,
    example,
    platform_of,
    register_agent,
    start_document,
    wait_run,
    wait_status,
    wait_until,
)
from tests.mcp_server import PNG, running_mcp
from tests.scripted_agent import AgentFailure, ScriptedAgent, serving

pytestmark = pytest.mark.integration



@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


def web_agent(title: str) -> ScriptedAgent:
    return ScriptedAgent({"navigate": lambda b: {"url": b["params"]["url"]}, "wait_for_element": lambda b: {},
                          "extract_text": lambda b: title, "screenshot": lambda b: {"uri": "file:///tmp/s.png"}})


async def test_web_title_check_completes_with_the_agent(platform: Platform) -> None:
    c = platform.client
    async with serving(web_agent("Example Domain")) as agent:
        await register_agent(c, agent, "web")
        run_id = await start_document(c, example("web_title_check.ckp.json"))
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"]["title"] == "Example Domain"
    assert [r["action"] for r in agent.requests] == ["navigate", "wait_for_element", "extract_text", "screenshot"]
    assert all(r["idempotency_key"].startswith(f"lo1:{run_id}:open_page:") for r in agent.requests)
    # step_started names the agent chosen for the attempt (ckp.md §8); internal steps have none
    started = [e for e in await events_of(c, run_id) if e["event_type"] == "step_started"]
    agents = {e["payload"]["action"]: e["payload"]["agent_id"] for e in started}
    assert agents["navigate"] == agents["extract_text"] == "web_one"
    assert all(e["payload"]["agent_id"] is None for e in started if e["payload"]["binding_kind"] == "internal")
    order = [e["event_type"] for e in await events_of(c, run_id) if e.get("step_id") == "navigate"]
    assert order[:2] == ["step_started", "step_completed"]


async def test_web_title_check_verification_failure_ends_the_run(platform: Platform) -> None:
    c = platform.client
    async with serving(web_agent("Another title")) as agent:
        await register_agent(c, agent, "web")
        run_id = await start_document(c, example("web_title_check.ckp.json"))
        run = await wait_status(c, run_id)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "verification_failed"
    started = [e["node_id"] for e in await events_of(c, run_id) if e["event_type"] == "node_started"]
    assert "done" not in started


LOOP_DOC = {
    "procedure_id": "loop_calls", "version": "1",
    "workflow_graph": {"start_node": "each", "nodes": {
        "each": {"type": "loop", "iterator": "[1, 2, 3]", "iterator_variable": "n", "body_node": "call",
                 "collect_variable": "results", "collect_expression": "{{r}}", "next_node": "done"},
        "call": {"type": "sequence", "agent": "API", "steps": [
            {"step_id": "compute", "action": "compute", "n": "{{n}}", "output_variable": "r"}]},
        "done": {"type": "terminate", "outputs": {"results": "{{results}}"}}}},
}


async def test_loop_of_three_agent_calls_returns_three_distinct_results(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"compute": lambda b: {"value": b["params"]["n"] * 10}})
    async with serving(agent):
        await register_agent(c, agent, "api")
        run_id = await start_document(c, LOOP_DOC)
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"]["results"] == [{"value": 10}, {"value": 20}, {"value": 30}]
    assert len(agent.executed) == len(set(agent.executed)) == 3
    assert [k.split(":")[4] for k in agent.executed] == ["each[0]", "each[1]", "each[2]"]


RETRY_DOC = {
    "procedure_id": "retry_me", "version": "1",
    "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "agent": "API", "next_node": "done", "steps": [
            {"step_id": "first", "action": "first", "output_variable": "a"},
            {"step_id": "second", "action": "second", "output_variable": "b"}]},
        "done": {"type": "terminate", "outputs": {"a": "{{a}}", "b": "{{b}}"}}}},
}


@pytest.mark.parametrize("strategy", ["every_node", "disabled"])
async def test_retry_resumes_at_the_failure_point(platform: Platform, strategy: str) -> None:
    """Under every strategy (ckp.md §7.12): under disabled the failure point is the only state persisted there."""
    c = platform.client
    calls = {"second": 0}

    def second(body: dict[str, Any]) -> Any:
        calls["second"] += 1
        if calls["second"] == 1:
            raise AgentFailure("not yet", "flaky")
        return "ok"

    agent = ScriptedAgent({"first": lambda b: "A", "second": second})
    async with serving(agent):
        await register_agent(c, agent, "api")
        run_id = await start_document(c, {**RETRY_DOC, "global_config": {"checkpoint_strategy": strategy}})
        failed = await wait_status(c, run_id)
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "agent_error"
        r = await c.post(f"/api/runs/{run_id}/retry", json={})
        assert r.status_code == 200, r.text
        done = await wait_status(c, run_id)
    assert done["status"] == "completed", done["error"]
    assert done["output_vars"] == {"a": "A", "b": "ok"}
    assert done["retry_count"] == 1
    assert [b["action"] for b in agent.requests] == ["first", "second", "second"]
    assert [b["attempt"] for b in agent.requests if b["action"] == "second"] == [1, 2]
    types = [e["event_type"] for e in await events_of(c, run_id)]
    assert "run_retry_requested" in types
    assert "step_replayed" in types
    again = await c.post(f"/api/runs/{run_id}/retry", json={})
    assert again.status_code == 409
    assert again.json()["code"] == "invalid_run_transition"


async def test_cancel_a_running_run_aborts_the_in_flight_call(platform: Platform) -> None:
    c = platform.client
    release = asyncio.Event()

    async def slow(body: dict[str, Any]) -> Any:
        await asyncio.wait_for(release.wait(), 30)
        return "late"

    agent = ScriptedAgent({"first": slow, "second": lambda b: "never"})
    async with serving(agent):
        await register_agent(c, agent, "api")
        run_id = await start_document(c, RETRY_DOC)
        await wait_until(lambda: agent.requests)  # the first call is in flight
        r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "operator"})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "canceling"
        run = await wait_status(c, run_id)
        release.set()
    assert run["status"] == "canceled"
    assert [b["action"] for b in agent.requests] == ["first"]
    canceled = [e for e in await events_of(c, run_id) if e["event_type"] == "run_canceled"]
    assert canceled[0]["payload"]["reason"] == "operator"
    finished = await c.post(f"/api/runs/{run_id}/cancel", json={})
    assert finished.status_code == 200


async def test_cancel_a_suspended_run_is_immediate(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "gate_only", "version": "1", "workflow_graph": {"start_node": "g", "nodes": {
        "g": {"type": "human_approval", "on_approve": "e", "on_reject": "e"}, "e": {"type": "terminate"}}}}
    run_id = await start_document(c, doc)
    assert (await wait_status(c, run_id, ("waiting_approval", *TERMINAL)))["status"] == "waiting_approval"
    r = await c.post(f"/api/runs/{run_id}/cancel", json={})
    assert r.status_code in (200, 202), r.text
    run = await wait_status(c, run_id)
    assert run["status"] == "canceled"


async def test_resume_on_failure_retries_a_retryable_failure_once(platform: Platform) -> None:
    c = platform.client
    calls = {"second": 0}

    def second(body: dict[str, Any]) -> Any:
        calls["second"] += 1
        if calls["second"] == 1:
            raise AgentFailure("busy", "busy", retryable=True)
        return "ok"

    doc = {**RETRY_DOC, "procedure_id": "auto_retry",
           "global_config": {"resume_on_failure": True, "retry_delay_ms": 100}}
    agent = ScriptedAgent({"first": lambda b: "A", "second": second})
    async with serving(agent):
        await register_agent(c, agent, "api")
        run_id = await start_document(c, doc)
        # failed first (retryable), then retried automatically once (run_retry_requested) and completed
        run = await wait_run(c, run_id, ended_after_a_retry)
    assert run["status"] == "completed", run["error"]
    retries = [e for e in await events_of(c, run_id) if e["event_type"] == "run_retry_requested"]
    assert [e["payload"]["automatic"] for e in retries] == [True]
    assert calls["second"] == 2


async def test_inline_artifact_is_stored_and_replaced_in_the_result(platform: Platform) -> None:
    import base64

    import nats

    c = platform.client
    content = base64.b64encode(b"report body").decode()
    agent = ScriptedAgent({"export": lambda b: {"artifact": {"kind": "file", "name": "r.txt",
                                                             "mime_type": "text/plain", "content_base64": content}}})
    doc = {"procedure_id": "artifact_out", "version": "1", "workflow_graph": {"start_node": "a", "nodes": {
        "a": {"type": "sequence", "agent": "API", "next_node": "z",
              "steps": [{"step_id": "e", "action": "export", "output_variable": "exported"}]},
        "z": {"type": "terminate", "outputs": {"exported": "{{exported}}"}}}}}
    async with serving(agent):
        await register_agent(c, agent, "api")
        run = await wait_status(c, await start_document(c, doc))
    assert run["status"] == "completed", run["error"]
    [created] = [e["payload"] for e in await events_of(c, run["run_id"]) if e["event_type"] == "artifact_created"]
    assert (created["stored"], created["size_bytes"], created["name"]) == (True, 11, "r.txt")
    assert run["output_vars"]["exported"]["artifact"] == {"artifact_id": created["artifact_id"],
                                                          "uri": f"lo-artifact://{created['artifact_id']}"}
    nc = await nats.connect(platform.nats_url)
    try:
        store = await nc.jetstream().object_store("lo_artifacts")
        assert (await store.get(created["artifact_id"])).data == b"report body"
    finally:
        await nc.close()


async def test_validation_only_mode_completes_without_running_a_node(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "validate_only", "version": "1", "global_config": {"execution_mode": "validation_only"},
           "workflow_graph": {"start_node": "a", "nodes": {
               "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "s", "action": "x"}]},
               "z": {"type": "terminate"}}}}
    run = await wait_status(c, await start_document(c, doc))
    assert run["status"] == "completed"
    events = await events_of(c, run["run_id"])
    assert [e["event_type"] for e in events] == ["run_created", "execution_started", "run_completed"]
    assert events[-1]["payload"]["mode"] == "validation_only"
    assert events[-1]["payload"]["message"].startswith("Execution skipped (mode=validation_only)")


async def test_web_title_check_without_an_agent_fails_with_no_executor(platform: Platform) -> None:
    c = platform.client
    run_id = await start_document(c, example("web_title_check.ckp.json"))
    run = await wait_status(c, run_id, timeout=60)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "no_executor", run["error"]
    assert "web" in run["error"]["message"].lower(), run["error"]


MCP_DOC = {
    "procedure_id": "mcp_snapshot", "version": "1",
    "workflow_graph": {"start_node": "shoot", "nodes": {
        "shoot": {"type": "sequence", "agent": "DOCS", "next_node": "done", "steps": [
            {"step_id": "snap", "action": "snapshot", "page": "home", "output_variable": "shot"}]},
        "done": {"type": "terminate", "outputs": {"shot": "{{shot}}"}}}},
}


async def test_mcp_image_and_resource_content_are_stored_artifacts_linked_in_the_output(platform: Platform) -> None:
    c = platform.client
    async with running_mcp() as server:
        r = await c.post("/api/agents", json={"name": "docs", "channel": "docs", "base_url": server.url,
                                              "protocol": "mcp", "capabilities": ["snapshot"]})
        assert r.status_code == 201, r.text
        run_id = await start_document(c, MCP_DOC)
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    text, image, page, raw, link = run["output_vars"]["shot"]
    assert text == {"type": "text", "text": "captured home"}
    created = {e["payload"]["artifact_id"]: e["payload"] for e in await events_of(c, run_id)
               if e["event_type"] == "artifact_created"}
    assert len(created) == 4
    assert all(e["step_id"] == "snap" for e in await events_of(c, run_id) if e["event_type"] == "artifact_created")
    assert (image["type"], image["mime_type"], image["uri"]) == ("image", "image/png",
                                                                 f"lo-artifact://{image['artifact_id']}")
    assert created[image["artifact_id"]]["stored"] is True
    assert created[image["artifact_id"]]["size_bytes"] == len(PNG)
    content = await c.get(f"/api/runs/{run_id}/artifacts/{image['artifact_id']}/content")
    assert content.status_code == 200
    assert content.content == PNG
    assert (page["type"], page["name"], page["mime_type"]) == ("resource", "home.html", "text/html")
    assert (await c.get(f"/api/runs/{run_id}/artifacts/{page['artifact_id']}/content")).content == b"<h1>home</h1>"
    assert (await c.get(f"/api/runs/{run_id}/artifacts/{raw['artifact_id']}/content")).content == b"\x00\x01raw"
    assert link["uri"] == "https://example.com/page.pdf"
    assert created[link["artifact_id"]]["stored"] is False


async def test_pool_waiting_steps_count_attempts_waiting_for_a_slot(platform: Platform) -> None:
    """api.md §7.1 PoolOut.waiting_steps: a step whose pool is saturated waits (``pool_saturated``) and is counted
    until it gets the slot."""
    c = platform.client
    behaviour = AgentBehaviour(execute_delay_s=1.5)
    async with running_agent(behaviour) as agent:
        r = await c.post("/api/agents", json={"agent_id": "slow1", "name": "slow1", "channel": "slowpool",
                                              "base_url": agent.base_url, "concurrency_limit": 1,
                                              "pool_id": "slow_pool", "capabilities": ["extract_text"]})
        assert r.status_code == 201, r.text
        doc = {"procedure_id": "pool_wait", "version": "1", "workflow_graph": {"start_node": "get", "nodes": {
            "get": {"type": "sequence", "agent": "SLOWPOOL", "steps": [
                {"step_id": "t", "action": "extract_text", "output_variable": "out"}], "next_node": "end"},
            "end": {"type": "terminate"}}}}
        first = await start_document(c, doc)
        second = await start_document(c, doc)

        async def waiting() -> int:
            pools = (await c.get("/api/agents/pools", params={"channel": "slowpool"})).json()["items"]
            return int(pools[0]["waiting_steps"])

        deadline = asyncio.get_running_loop().time() + 20
        while await waiting() != 1:
            assert asyncio.get_running_loop().time() < deadline, "no step ever waited for the pool"
            await asyncio.sleep(0.05)
        for run_id in (first, second):
            assert (await wait_status(c, run_id))["status"] == "completed"
        assert await waiting() == 0
