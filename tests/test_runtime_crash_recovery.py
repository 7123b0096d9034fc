"""Issue 2 acceptance: a runtime process SIGKILLed in the middle of a run; a second one finishes it, from the last
state its ``checkpoint_strategy`` persisted (ckp.md §7.3)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import nats
import pytest

from langorch_infra.jetstream import JetStreamEventStore
from tests.helpers import follow_run, import_procedure, langorch_command, platform_of

pytestmark = pytest.mark.integration

SLOW = {
    "procedure_id": "crash_window", "version": "1.0.0",
    "variables_schema": {"label": {"type": "string", "default": "x"}},
    "workflow_graph": {"start_node": "prep", "nodes": {
        "prep": {"type": "sequence", "next_node": "work", "is_checkpoint": True, "steps": [
            {"step_id": "first", "action": "set_variable", "variable": "ready", "value": True}]},
        "work": {"type": "sequence", "next_node": "finish", "steps": [
            {"step_id": "before", "action": "set_variable", "variable": "seen", "value": "{{label}}-1"},
            {"step_id": "pause", "action": "wait", "duration_ms": 2500},
            {"step_id": "after", "action": "log", "message": "after the wait: {{seen}}"},
        ]},
        "finish": {"type": "sequence", "next_node": "done", "steps": [
            {"step_id": "mark", "action": "set_variable", "variable": "result", "value": "{{seen}}-done"}]},
        "done": {"type": "terminate", "outputs": {"result": "{{result}}"}},
    }},
}


def start_runtime(nats_url: str, database_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url,
                        "LANGORCH_ACK_WAIT_S": "2"}
    with log.open("ab") as out:
        return subprocess.Popen(langorch_command("serve", "runtime"), env=env, stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.mark.parametrize("strategy", ["every_node", "critical_nodes_only", "disabled"])
async def test_second_runtime_finishes_a_run_after_sigkill(nats_url: str, database_url: str, tmp_path: Path,
                                                          strategy: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False) as p:
        c = p.client
        await import_procedure(c, {**SLOW, "global_config": {"checkpoint_strategy": strategy}})
        first = start_runtime(nats_url, database_url, tmp_path / "runtime-a.log")
        second: subprocess.Popen[bytes] | None = None
        try:
            r = await c.post("/api/runs", json={"procedure_id": "crash_window", "procedure_version": "1.0.0"})
            run_id = r.json()["run_id"]
            # read the live stream, on one connection, until the wait step has started: the process is inside the
            # window (a connection per event could take longer than the window on a loaded machine)
            seen, end = await follow_run(
                c, run_id, until=lambda e: e["event_type"] == "step_started" and e["step_id"] == "pause")
            assert end is None, "the run ended before the crash window"
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            second = start_runtime(nats_url, database_url, tmp_path / "runtime-b.log")
            rest, end = await asyncio.wait_for(follow_run(c, run_id, last_event_id=seen[-1]["stream_seq"]), 90)
            assert end == "completed", (tmp_path / "runtime-b.log").read_text()
            assert rest[-1]["payload"]["outputs"] == {"result": "x-1-done"}
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(10)

    nc = await nats.connect(nats_url)
    try:
        events = [e.envelope for e in await JetStreamEventStore(nc.jetstream()).read("run", run_id)]
    finally:
        await nc.close()
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "gaps or duplicates in seq"
    completions = Counter((e.data["node_id"], e.data["step_id"], e.data["frame"])
                          for e in events if e.type == "step_completed")
    assert completions
    assert max(completions.values()) == 1, completions
    types = [e.type for e in events]
    assert "execution_recovered" in types
    recovered = next(e for e in events if e.type == "execution_recovered")
    assert recovered.data["delivery_count"] >= 2
    # the step finished before the crash is replayed, not executed again
    assert completions[("work", "before", "-")] == 1
    replays = [e.data["step_id"] for e in events if e.type == "step_replayed"]
    # every_node resumes at the node that was executing, critical_nodes_only after prep (is_checkpoint),
    # disabled at the start of the main path: prep runs again and its step is replayed
    assert replays == (["first", "before"] if strategy == "disabled" else ["before"])
    saved = [e.data for e in events if e.type == "checkpoint_saved"]
    if strategy == "disabled":
        assert saved == []
    else:
        [point] = saved
        assert (point["reason"], point["node_id"]) == ("is_checkpoint", "prep")
        assert point["checkpoint_id"] is not None
        assert recovered.data["checkpoint_id"] is not None
    # the interrupted wait is re-sent with the same attempt and idempotency key
    pause_starts = [e.data for e in events if e.type == "step_started" and e.data["step_id"] == "pause"]
    assert len(pause_starts) == 2
    assert pause_starts[0]["idempotency_key"] == pause_starts[1]["idempotency_key"]
    assert types.count("run_completed") == 1
