"""``product_enrichment_pipeline`` end to end on the real platform (examples/README.md): the premium path runs both
branches, passes the ``is_checkpoint`` node and pauses for approval; the runtime that ran it is SIGKILLed while the
run waits, a fresh runtime subprocess takes the decision, and the run finishes without repeating a completed step.
The standard path runs only its own branch."""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import example, platform_of
from tests.test_chaos import DEADLINE_S, kill, logs, run_events, runtimes, start_run, start_runtime, wait_terminal

pytestmark = pytest.mark.integration

DOC = example("product_enrichment_pipeline.ckp.json")
BEFORE_PAUSE = ["fetch_product", "quality_check", "premium_enrichment", "premium_sentiment", "premium_tags",
                "aggregate_results", "approval_gate"]


async def waiting_approval(c: httpx.AsyncClient, run_id: str, tmp_path: Path) -> str:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S  # a runtime subprocess may start first
    while True:
        run: dict[str, Any] = (await c.get(f"/api/runs/{run_id}")).json()
        waiting = run.get("waiting_on") or {}
        if run["status"] == "waiting_approval" and waiting.get("approval_id"):
            approval_id = str(waiting["approval_id"])
            if (await c.get(f"/api/approvals/{approval_id}")).status_code == 200:
                return approval_id
        assert asyncio.get_running_loop().time() < deadline, f"{run}\n{logs(tmp_path)}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("decision", "status", "after"), [
    ("approved", "completed", ["publish_results", "success_termination"]),
    ("rejected", "failed", ["cleanup_rejected", "rejection_termination"]),
])
async def test_premium_run_survives_a_runtime_kill_while_waiting_for_approval(
        nats_url: str, database_url: str, tmp_path: Path, decision: str, status: str, after: list[str]) -> None:
    async with platform_of(nats_url, database_url, runtime=False) as p, \
            runtimes(nats_url, database_url, tmp_path) as procs:
        c = p.client
        procs.append(start_runtime(nats_url, database_url, tmp_path / "runtime-a.log"))
        run_id = await start_run(c, DOC, {"product_id": 7, "enrichment_mode": "premium"})
        approval_id = await waiting_approval(c, run_id, tmp_path)
        kill(procs[0])
        procs.append(start_runtime(nats_url, database_url, tmp_path / "runtime-b.log"))
        r = await c.post(f"/api/approvals/{approval_id}/decision", json={"decision": decision})
        assert r.status_code == 200, r.text
        run = await wait_terminal(c, run_id, DEADLINE_S, tmp_path)  # runtime-b starts first
    assert run["status"] == status, (run["error"], logs(tmp_path))
    events = await run_events(nats_url, run_id)
    types = [e.type for e in events]
    resumed = types.index("execution_resumed")
    started = [e.data["node_id"] for e in events if e.type == "node_started"]
    # every node before the pause ran once, before it; after the decision only the chosen route ran
    assert started[:len(BEFORE_PAUSE)] == BEFORE_PAUSE[:2] + started[2:len(BEFORE_PAUSE)]
    assert sorted(started[2:6]) == sorted(BEFORE_PAUSE[2:6])
    after_resume = [e.data["node_id"] for e in events[resumed:] if e.type == "node_started"]
    assert after_resume == after, after_resume
    completions = Counter((e.data["node_id"], e.data["step_id"], e.data["frame"])
                          for e in events if e.type == "step_completed")
    assert max(completions.values()) == 1, completions
    assert {n for n, _, _ in completions} >= {"fetch_product", "premium_sentiment", "premium_tags"}
    saved = [e.data for e in events if e.type == "checkpoint_saved"]
    assert [s["reason"] for s in saved] == ["is_checkpoint"]
    if status == "completed":
        assert run["output_vars"]["publish_response"] == {"status": "published", "product_id": 7}


async def test_standard_run_takes_the_standard_branch_only(nats_url: str, database_url: str, tmp_path: Path) -> None:
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        run_id = await start_run(c, DOC, {"product_id": 3})
        approval_id = await waiting_approval(c, run_id, tmp_path)
        r = await c.post(f"/api/approvals/{approval_id}/decision", json={"decision": "approved"})
        assert r.status_code == 200, r.text
        run = await wait_terminal(c, run_id, 30, tmp_path)
    assert run["status"] == "completed", run["error"]
    started = [e.data["node_id"] for e in await run_events(nats_url, run_id) if e.type == "node_started"]
    assert started == ["fetch_product", "quality_check", "standard_enrichment", "aggregate_results", "approval_gate",
                       "publish_results", "success_termination"]


async def test_approval_timeout_routes_to_cleanup_rejected_by_itself(nats_url: str, database_url: str,
                                                                      tmp_path: Path) -> None:
    """examples/README.md: "a timeout routes to cleanup_rejected by itself" — the same document with the approval's
    300 s timeout shortened to 1 s, and nobody deciding."""
    doc = copy.deepcopy(DOC)
    doc["procedure_id"] = "product_enrichment_timeout"
    doc["workflow_graph"]["nodes"]["approval_gate"]["timeout_ms"] = 1000
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        run_id = await start_run(c, doc, {"product_id": 5})
        approval_id = await waiting_approval(c, run_id, tmp_path)
        run = await wait_terminal(c, run_id, 30, tmp_path)
        approval = (await c.get(f"/api/approvals/{approval_id}")).json()
    assert approval["status"] == "timed_out", approval
    assert run["status"] == "failed", run["error"]
    started = [e.data["node_id"] for e in await run_events(nats_url, run_id) if e.type == "node_started"]
    assert started[-3:] == ["approval_gate", "cleanup_rejected", "rejection_termination"]
    assert "publish_results" not in started
