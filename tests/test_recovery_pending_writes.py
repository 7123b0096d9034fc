"""Issue 19: a run whose replica stopped after a super-step's writes were stored but before the checkpoint after it.

LangGraph stores a finished task's writes with the checkpoint the task ran from (``aput_writes``), then the next
checkpoint (``aput``). A replica lost between the two (SIGKILL, or PostgreSQL failing the second write) leaves a
checkpoint whose ``next`` is empty — its one task finished — although the run goes on. The run was taken as ended
there: on the local cluster it stayed ``running`` for ever after a takeover (later it failed with
``internal_error``). Here the second write fails once, deterministically, at a chosen super-step; the command is
redelivered and the run must continue from the stored writes and complete, the finished super-step not run again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from tests.helpers import follow_run, import_procedure, platform_of
from tests.test_chaos import run_events

pytestmark = pytest.mark.integration

FAILED_STEP = 2  # the checkpoint after the second node's super-step (input -1, __start__ 0, first node 1)

STEPS = {
    "procedure_id": "pending_writes", "version": "1.0.0",
    "global_config": {"checkpoint_strategy": "every_node"},
    "variables_schema": {"label": {"type": "string", "default": "x"}},
    "workflow_graph": {"start_node": "one", "nodes": {
        "one": {"type": "sequence", "next_node": "two", "steps": [
            {"step_id": "a", "action": "set_variable", "variable": "first", "value": "{{label}}-1"}]},
        "two": {"type": "sequence", "next_node": "three", "steps": [
            {"step_id": "b", "action": "set_variable", "variable": "second", "value": "{{first}}-2"}]},
        "three": {"type": "sequence", "next_node": "done", "steps": [
            {"step_id": "c", "action": "set_variable", "variable": "third", "value": "{{second}}-3"}]},
        "done": {"type": "terminate", "outputs": {"result": "{{third}}"}},
    }},
}


def fail_one_checkpoint(saver: Any, failed: list[str]) -> None:
    """The saver's ``aput`` of the run's checkpoint at ``FAILED_STEP`` fails once, after the writes of the task
    before it are stored (what a replica lost between LangGraph's two writes leaves in PostgreSQL)."""
    original = saver.aput

    async def aput(config: dict[str, Any], checkpoint: Any, metadata: dict[str, Any], versions: Any) -> Any:
        if metadata.get("source") != "loop" or metadata.get("step") != FAILED_STEP or failed:
            return await original(config, checkpoint, metadata, versions)
        failed.append(str(config["configurable"]["checkpoint_id"]))
        deadline = time.monotonic() + 60
        while not (await saver.aget_tuple(config)).pending_writes:  # the task's writes go in concurrently
            assert time.monotonic() < deadline, "the finished task's writes were never stored"
            await asyncio.sleep(0.05)
        raise OSError("the checkpoint write was lost (as by a replica killed before it)")

    saver.aput = aput


async def test_a_run_continues_from_the_writes_of_a_super_step_whose_next_checkpoint_was_lost(
        nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        failed: list[str] = []
        for saver in p.runtime_service.savers:
            fail_one_checkpoint(saver, failed)
        await import_procedure(c, STEPS)
        r = await c.post("/api/runs", json={"procedure_id": "pending_writes", "procedure_version": "1.0.0"})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        events, end = await asyncio.wait_for(follow_run(c, run_id), 120)
        assert failed, "the checkpoint write was never failed: the test did not reach its window"
        assert end == "completed", [(e["event_type"], e.get("payload")) for e in events[-5:]]
        assert events[-1]["payload"]["outputs"] == {"result": "x-1-2-3"}

    stored = await run_events(nats_url, run_id)
    types = [e.type for e in stored]
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1)), "gaps or duplicates in seq"
    [recovered] = [e.data for e in stored if e.type == "execution_recovered"]
    assert recovered["checkpoint_id"] == failed[0]  # the checkpoint holding the finished super-step's writes
    assert recovered["delivery_count"] >= 2
    # the super-step whose writes were stored is not executed again, nor any step before it
    started = Counter(e.data["step_id"] for e in stored if e.type == "step_started")
    assert started == {"a": 1, "b": 1, "c": 1}, started
    assert "step_replayed" not in types
    assert types.count("run_completed") == 1
    assert "run_failed" not in types
