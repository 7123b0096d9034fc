"""llm_action nodes against a real OpenAI-compatible server (ckp.md §3.12, §7.13), end to end."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import Platform, events_of, platform_of, register_agent, start_document, wait_status
from tests.llm_server import LlmServerState, RunningLlmServer, running_llm_server
from tests.mcp_server import PNG
from tests.scripted_agent import ScriptedAgent, serving

pytestmark = pytest.mark.integration


@pytest.fixture
async def llm() -> AsyncIterator[RunningLlmServer]:
    async with running_llm_server(LlmServerState()) as server:
        yield server


@pytest.fixture
async def platform(nats_url: str, database_url: str, llm: RunningLlmServer) -> AsyncIterator[Platform]:
    models = {"m-small": {"prompt_usd_per_1k": 1.0, "completion_usd_per_1k": 2.0, "fallbacks": ["m-backup"]},
              "m-backup": {"prompt_usd_per_1k": 1.0, "completion_usd_per_1k": 2.0}}
    async with platform_of(nats_url, database_url, runtime_settings={
            "llm_base_url": llm.base_url(), "llm_models": models, "llm_default_model": "m-small"}) as p:
        yield p


DOC = {
    "procedure_id": "llm_extract", "version": "1",
    "variables_schema": {"invoice": {"type": "string", "default": "ACME 42 EUR"}},
    "workflow_graph": {"start_node": "ask", "nodes": {
        "ask": {"type": "llm_action", "model": "m-small", "prompt": "Extract vendor and amount: {{invoice}}",
                "system_prompt": "You extract data.", "json_mode": True,
                "retry": {"max_retries": 1, "strategy": "fixed", "retry_delay_ms": 10},
                "outputs": {"vendor": "json_extract: vendor", "amount": "$.amount"}, "next_node": "route"},
        "route": {"type": "llm_action", "prompt": "Big or small? {{amount}}", "orchestration_mode": True,
                  "branches": ["big", "small"], "next_node": "small"},
        "big": {"type": "terminate", "outputs": {"vendor": "{{vendor}}", "lane": "big"}},
        "small": {"type": "terminate", "outputs": {"vendor": "{{vendor}}", "lane": "small"}}}},
}


async def test_llm_outputs_routing_usage_and_fallback(platform: Platform, llm: RunningLlmServer) -> None:
    c = platform.client
    state = llm.state
    state.model("m-small").script = [(503, None, {})]  # the first call falls back to m-backup
    state.model("m-backup").answer = json.dumps({"vendor": "ACME", "amount": 42})
    state.model("m-small").answer = json.dumps({"_next_node": "big"})
    run = await wait_status(c, await start_document(c, DOC))
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"vendor": "ACME", "lane": "big"}
    first = state.requests[0]["body"]
    assert first["messages"][0] == {"role": "system", "content": "You extract data."}
    assert first["response_format"] == {"type": "json_object"}
    assert [r["model"] for r in state.requests] == ["m-small", "m-backup", "m-small"]
    events = await events_of(c, run["run_id"])
    usage = [e["payload"] for e in events if e["event_type"] == "llm_usage"]
    assert [u["model"] for u in usage] == ["m-backup", "m-small"]
    assert usage[0]["estimated_cost_usd"] == pytest.approx((11 * 1.0 + 7 * 2.0) / 1000)
    [route] = [e["payload"] for e in events if e["event_type"] == "llm_route_selected"]
    assert (route["requested"], route["chosen"], route["valid"]) == ("big", "big", True)
    assert run["total_prompt_tokens"] == 22
    assert run["estimated_cost_usd"] == pytest.approx(2 * (11 + 14) / 1000)


async def test_llm_non_retryable_error_fails_the_node(platform: Platform, llm: RunningLlmServer) -> None:
    c = platform.client
    llm.state.model("m-small").status = 400
    doc: dict[str, Any] = {**DOC, "procedure_id": "llm_bad"}
    run = await wait_status(c, await start_document(c, doc))
    assert run["status"] == "failed"
    assert run["error"]["code"] == "llm_error"
    assert [r["model"] for r in llm.state.requests] == ["m-small"]


async def test_budget_exceeded_before_the_call(platform: Platform, llm: RunningLlmServer) -> None:
    c = platform.client
    doc: dict[str, Any] = {**DOC, "procedure_id": "llm_budget", "global_config": {"max_cost_usd": 0.000001}}
    doc["workflow_graph"] = json.loads(json.dumps(DOC["workflow_graph"]))
    doc["workflow_graph"]["nodes"]["ask"]["max_tokens"] = 500
    run = await wait_status(c, await start_document(c, doc))
    assert run["status"] == "failed"
    assert run["error"]["code"] == "budget_exceeded"
    assert llm.state.requests == []


VISION_DOC = {
    "procedure_id": "llm_vision", "version": "1",
    "variables_schema": {"image_id": {"type": "string", "default": ""}},
    "workflow_graph": {"start_node": "shoot", "nodes": {
        "shoot": {"type": "sequence", "agent": "WEB", "next_node": "look", "steps": [
            {"step_id": "snap", "action": "capture", "output_variable": "shot"}]},
        "look": {"type": "llm_action", "model": "m-small", "prompt": "What is on the page?", "attachments": [
            {"type": "image", "source": "{{shot.artifact}}", "description": "the page"},
            {"type": "image", "source": {"artifact_id": "{{image_id}}"}, "description": "another one"}],
            "next_node": "done"},
        "done": {"type": "terminate", "outputs": {"answer": "{{llm_output}}"}}}},
}


async def test_llm_image_attachment_from_a_stored_artifact(platform: Platform, llm: RunningLlmServer) -> None:
    c = platform.client
    png = base64.b64encode(PNG).decode()
    agent = ScriptedAgent({"capture": lambda b: {"artifact": {"kind": "screenshot", "name": "page.png",
                                                              "mime_type": "image/png", "content_base64": png}}})

    async def refused(run_id: str, artifact_id: str) -> list[str]:
        run = await wait_status(c, run_id)
        assert run["status"] == "failed"
        assert run["error"]["code"] == "llm_error", run["error"]
        events = await events_of(c, run_id)
        [failure] = [e["payload"]["error"] for e in events if e["event_type"] == "node_error"]
        assert failure["details"]["reason"] == "invalid_attachment"
        assert failure["details"]["problem"] == f"no stored artifact '{artifact_id}' of this run"
        return [e["payload"]["artifact_id"] for e in events if e["event_type"] == "artifact_created"]

    async with serving(agent):
        await register_agent(c, agent, "web")
        # the second attachment names a missing artifact, then one another run stored: both fail the node
        missing = "0192f7c4-0000-7000-8000-00000000"
        stored = await refused(await start_document(c, VISION_DOC, {"image_id": missing}), missing)
        await refused(await start_document(c, VISION_DOC, {"image_id": stored[0]}), stored[0])
        assert llm.state.requests == []
        llm.state.model("m-small").answer = "a login form"
        own = copy.deepcopy(VISION_DOC)
        own["procedure_id"] = "llm_vision_own"
        own["workflow_graph"]["nodes"]["look"]["attachments"][1]["source"] = {
            "artifact_id": "{{shot.artifact.artifact_id}}"}
        run = await wait_status(c, await start_document(c, own))
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"answer": "a login form"}
    [request] = llm.state.requests
    parts = request["body"]["messages"][-1]["content"]
    assert parts[0] == {"type": "text", "text": "What is on the page?"}
    url = f"data:image/png;base64,{png}"
    assert parts[1:] == [{"type": "image_url", "image_url": {"url": url}},
                         {"type": "image_url", "image_url": {"url": url}}]
