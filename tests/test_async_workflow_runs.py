"""Async workflow dispatch end to end (ckp.md §4.6, api.md §5.10, §15.2): the hybrid_dispatch example pauses at
the async step until the agent's callback, then resumes after that step, not from the start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.helpers import Platform, events_of, example, platform_of, start_document, wait_status
from tests.scripted_agent import ACCEPTED, ScriptedAgent, serving

pytestmark = pytest.mark.integration


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url, runtime_settings={"callback_timeout_s": 60}) as p:
        yield p


async def register_hybrid(c: httpx.AsyncClient, agent: ScriptedAgent) -> None:
    r = await c.post("/api/agents", json={"name": "hybrid", "channel": "hybrid", "base_url": agent.base_url,
                                          "capabilities": ["browser.navigate", {"name": "run_full_salesforce_login",
                                                                                "type": "workflow"}]})
    assert r.status_code == 201, r.text  # registered: a dispatch syncs the runtime's registry before it looks


def hybrid_agent() -> ScriptedAgent:
    def login(body: dict[str, Any]) -> Any:
        return ACCEPTED if body["dispatch_mode"] == "async" else {"logged_in": True, "mode": "sync"}

    return ScriptedAgent({"browser.navigate": lambda b: {"url": b["params"]["url"]},
                          "run_full_salesforce_login": login})


async def test_hybrid_dispatch_pauses_for_the_callback_and_resumes_after_the_step(platform: Platform) -> None:
    c = platform.client
    async with serving(hybrid_agent()) as agent:
        await register_hybrid(c, agent)
        run_id = await start_document(c, example("hybrid_dispatch.ckp.json"))
        paused = await wait_status(c, run_id, ("paused", "failed", "completed"))
        assert paused["status"] == "paused", paused["error"]
        assert paused["waiting_on"]["kind"] == "callback"
        assert [b["dispatch_mode"] for b in agent.requests] == ["tool", "async"]
        delegated = agent.requests[1]
        assert delegated["params"]["_workflow_context"]["dispatch_mode"] == "async"
        callback_url = delegated["params"]["callback_url"]
        token = delegated["callback"]["token"]
        assert callback_url.endswith(f"?token={token}")

        bad = await c.post(f"/api/runs/{run_id}/callback", json={"status": "success"},
                           headers={"X-LangOrch-Callback-Token": token[:-2] + "xx"})
        assert bad.status_code == 403
        assert bad.json()["code"] == "invalid_callback_token"
        async with httpx.AsyncClient() as outside:  # the agent calls back with the URL it was given
            r = await outside.post(callback_url, json={"status": "success", "output": {"session": "S-1"}})
        assert r.status_code == 202, r.text
        assert r.json() == {"resumed": True, "status": "queued", "run_id": run_id}
        run = await wait_status(c, run_id)
        again = await c.post(f"/api/runs/{run_id}/callback", json={"status": "success"},
                             headers={"X-LangOrch-Callback-Token": token})
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"mode": "hybrid_dispatch", "target": "https://example.com", "user": "demo_user"}
    assert [b["dispatch_mode"] for b in agent.requests] == ["tool", "async", "sync"]
    assert len(agent.executed) == 3  # the tool step before the pause was not executed again
    types = [e["event_type"] for e in await events_of(c, run_id)]
    i = types.index("workflow_callback_received")
    assert types[i + 1] == "execution_resumed"
    assert types.index("workflow_delegated") < types.index("node_paused") < i
    assert again.status_code == 200
    assert again.json() == {"resumed": False, "status": "completed"}


async def test_failure_callback_fails_the_step(platform: Platform) -> None:
    c = platform.client
    async with serving(hybrid_agent()) as agent:
        await register_hybrid(c, agent)
        run_id = await start_document(c, example("hybrid_dispatch.ckp.json"))
        await wait_status(c, run_id, ("paused",))
        url = agent.requests[1]["params"]["callback_url"]
        async with httpx.AsyncClient() as outside:
            r = await outside.post(url, json={"status": "failure", "error": "bad password",
                                              "error_code": "login_failed"})
        assert r.status_code == 202
        run = await wait_status(c, run_id)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "login_failed"
    assert [b["dispatch_mode"] for b in agent.requests] == ["tool", "async"]


async def test_callback_timeout_fails_the_step_with_callback_timeout(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime_settings={"callback_timeout_s": 1}) as p:
        c = p.client
        async with serving(hybrid_agent()) as agent:
            await register_hybrid(c, agent)
            run_id = await start_document(c, example("hybrid_dispatch.ckp.json"))
            run = await wait_status(c, run_id, timeout=30)
            types = [e["event_type"] for e in await events_of(c, run_id)]
    assert run["status"] == "failed"
    assert run["error"]["code"] == "callback_timeout"
    assert types.index("callback_timed_out") < types.index("run_failed")
