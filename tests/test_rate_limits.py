"""Rate limits per procedure (ckp.md §7.6), shared by every run and runtime replica through KV."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from langorch_infra.settings import RuntimeSettings
from langorch_runtime.service import RuntimeService
from tests.helpers import Platform, events_of, platform_of, register_agent, start_document, wait_status
from tests.scripted_agent import ScriptedAgent, serving

pytestmark = pytest.mark.integration


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


def calls_doc(pid: str, n: int, limits: dict[str, Any]) -> dict[str, Any]:
    return {"procedure_id": pid, "version": "1",
            "global_config": {"rate_limiting": {"enabled": True, **limits}},
            "workflow_graph": {"start_node": "each", "nodes": {
                "each": {"type": "loop", "iterator": f"range_{n}", "iterator_variable": "i", "body_node": "call",
                         "next_node": "done"},
                "call": {"type": "sequence", "agent": "API", "steps": [{"step_id": "c", "action": "ping"}]},
                "done": {"type": "terminate"}}},
            "variables_schema": {f"range_{n}": {"type": "array", "default": list(range(n))}}}


async def test_requests_per_minute_hold_across_runs_and_replicas(platform: Platform, nats_url: str,
                                                                 database_url: str) -> None:
    c = platform.client
    second = RuntimeService(RuntimeSettings(nats_url=nats_url, database_url=database_url, ack_wait_s=5))
    await second.start()
    task = asyncio.create_task(second.run())
    try:
        agent = ScriptedAgent({"ping": lambda b: "pong"})
        async with serving(agent):
            await register_agent(c, agent, "api")
            doc = calls_doc("rpm", 2, {"max_requests_per_minute": 3, "max_wait_ms": 300})
            runs = [await start_document(c, doc), await start_document(c, doc)]
            finished = [await wait_status(c, r) for r in runs]
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await second.stop()
    # 4 calls against a bucket of 3 per minute: exactly one is refused, whichever run or replica made it
    assert len(agent.requests) == 3
    statuses = sorted(f["status"] for f in finished)
    assert statuses == ["completed", "failed"]
    failed = next(f for f in finished if f["status"] == "failed")
    assert failed["error"]["code"] == "loop_iteration_failed"
    events = await events_of(c, failed["run_id"])
    [step_failed] = [e for e in events if e["event_type"] == "step_failed"]
    assert step_failed["payload"]["error"]["code"] == "rate_limited"


async def test_concurrent_operations_are_bounded(platform: Platform) -> None:
    c = platform.client
    in_flight = {"now": 0, "max": 0}

    async def slow(body: dict[str, Any]) -> str:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        await asyncio.sleep(0.2)
        in_flight["now"] -= 1
        return "done"

    doc = {"procedure_id": "conc", "version": "1",
           "global_config": {"rate_limiting": {"enabled": True, "max_concurrent_operations": 1,
                                               "max_wait_ms": 5000}},
           "workflow_graph": {"start_node": "fan", "nodes": {
               "fan": {"type": "parallel", "next_node": "done", "branches": [
                   {"branch_id": "a", "start_node": "x"}, {"branch_id": "b", "start_node": "y"},
                   {"branch_id": "c", "start_node": "w"}]},
               "x": {"type": "sequence", "agent": "API", "next_node": "done",
                     "steps": [{"step_id": "s", "action": "slow"}]},
               "y": {"type": "sequence", "agent": "API", "next_node": "done",
                     "steps": [{"step_id": "s", "action": "slow"}]},
               "w": {"type": "sequence", "agent": "API", "next_node": "done",
                     "steps": [{"step_id": "s", "action": "slow"}]},
               "done": {"type": "terminate"}}}}
    agent = ScriptedAgent({"slow": slow})
    async with serving(agent):
        await register_agent(c, agent, "api", name="slowpoke")
        run = await wait_status(c, await start_document(c, doc))
    assert run["status"] == "completed", run["error"]
    assert len(agent.requests) == 3
    assert in_flight["max"] == 1
