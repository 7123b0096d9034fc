"""A retry of a run canceled before its first super-step was checkpointed (its start command not yet consumed when
the cancel was): nothing of it ran, so it continues where it stopped — at its start (api.md §5.5) — instead of the
retry being dropped while the API had answered that it was queued."""

from __future__ import annotations

import asyncio

import pytest

from ckp_core.subjects import COMMAND_STREAM
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.service import RuntimeService
from tests.helpers import TERMINAL, events_of, platform_of, start_document, wait_status

pytestmark = pytest.mark.integration

PLAIN = {"procedure_id": "retry-from-start", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
    "s": {"type": "sequence", "next_node": "done", "steps": [
        {"step_id": "x", "action": "set_variable", "variable": "x", "value": 1}]},
    "done": {"type": "terminate", "outputs": {"x": "{{x}}"}}}}}


async def test_a_retry_of_a_run_canceled_before_its_first_checkpoint_runs_it_from_its_start(
        nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False) as p:
        c = p.client
        run_id = await start_document(c, PLAIN)  # created; no runtime consumes its start command yet
        # the start command is taken away, so the cancel below is handled first: as a start command not yet
        # consumed when the cancel was (a later start of a canceled run is dropped anyway)
        assert await p.app.state.js.purge_stream(COMMAND_STREAM, subject="lo.cmd.run.start")
        runtime = RuntimeService(RuntimeSettings(nats_url=nats_url, database_url=database_url, ack_wait_s=5,
                                                 public_url=p.base_url))
        await runtime.start()
        task = asyncio.create_task(runtime.run())
        try:
            assert (await c.post(f"/api/runs/{run_id}/cancel", json={})).status_code in (200, 202)
            assert (await wait_status(c, run_id, TERMINAL))["status"] == "canceled"
            types = [e["event_type"] for e in await events_of(c, run_id)]
            assert "execution_started" not in types, types  # canceled before anything ran: no checkpoint
            retried = await c.post(f"/api/runs/{run_id}/retry", json={})
            assert retried.status_code in (200, 202), retried.text
            run = await wait_status(c, run_id, ("completed", "failed"))
            events = await events_of(c, run_id)
        finally:
            task.cancel()
            await asyncio.wait({task})
            await runtime.stop()
    assert run["status"] == "completed", run
    assert run["output_vars"] == {"x": 1}, run
    resumed = [e["payload"] for e in events if e["event_type"] == "execution_resumed"]
    assert [r["resume_reason"] for r in resumed] == ["retry"], resumed
    assert resumed[0]["entry_node_id"] == "s", resumed  # from the start node
