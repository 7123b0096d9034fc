"""How soon the platform acts on a request, with its baselines measured in the same run on the same servers.

(a) Run start: from the moment ``POST /api/runs`` returns to the run's first ``node_started`` event (its
    timestamp), for a procedure whose first node is a one-step ``sequence``; goal ≤ 50 ms.
(b) Approval decision: a run paused at a ``human_approval`` node is decided through
    ``POST /api/approvals/{id}/decision``; from the moment that returns to the ``node_started`` of the node the
    approval routes to; goal p50 ≤ 50 ms.

Baselines, same process and servers: one JetStream hop (``js.publish`` awaiting its ack → the message delivered to
a push consumer of the same stream), and an empty FastAPI endpoint's round trip under uvicorn (the gateway's
stack without any work). The platform's paths are several such hops (gateway → command → service → event →
runtime), so the ratios say how many hops' worth each takes.

    uv run python bench/latency.py [--runs 20] [--approvals 10]

Prints one JSON object. Starts its own embedded NATS and PostgreSQL unless LANGORCH_TEST_NATS_URL /
LANGORCH_TEST_DATABASE_URL are set. Event timestamps and the bench's clock are the same machine's wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.runtime import Completions, run_events, start, stats
from bench.servers import bench_servers
from langorch_infra import loops
from tests.conftest import platform_of
from tests.helpers import import_procedure, pending_approval, serve_app

WARM_UP = 2


def first_node_procedure() -> dict[str, Any]:
    return {"procedure_id": "bench_first_node", "version": "1", "workflow_graph": {"start_node": "first", "nodes": {
        "first": {"type": "sequence", "next_node": "done", "steps": [
            {"step_id": "note", "action": "log", "message": "started"}]},
        "done": {"type": "terminate"}}}}


def approval_procedure() -> dict[str, Any]:
    return {"procedure_id": "bench_approval", "version": "1", "workflow_graph": {"start_node": "review", "nodes": {
        "review": {"type": "human_approval", "prompt": "Go on?", "on_approve": "after", "on_reject": "done"},
        "after": {"type": "sequence", "next_node": "done", "steps": [
            {"step_id": "note", "action": "log", "message": "approved"}]},
        "done": {"type": "terminate"}}}}


def ms_since(when: datetime, then: datetime) -> float:
    return (when - then).total_seconds() * 1000


def node_started(events: list[Any], node_id: str) -> datetime:
    return next(e.occurred_at for e in events if e.type == "node_started" and e.data["node_id"] == node_id)


def milestones(events: list[Any], since: datetime, node_id: str, into: dict[str, list[float]]) -> None:
    """The run's events from ``since`` up to the ``node_started`` of ``node_id``, each as ms after ``since``
    (added to ``into`` by event type): where the time until the node runs goes."""
    for e in events:
        if e.occurred_at >= since:
            into.setdefault(e.type, []).append(ms_since(e.occurred_at, since))
            if e.type == "node_started" and e.data["node_id"] == node_id:
                return


async def run_start_latency(p: Any, ends: Completions, runs: int) -> tuple[dict[str, list[float]],
                                                                          dict[str, list[float]]]:
    c = p.client
    doc = first_node_procedure()
    await import_procedure(c, doc)
    out: dict[str, list[float]] = {"post_ms": [], "response_to_node_started_ms": [], "post_to_node_started_ms": []}
    steps: dict[str, list[float]] = {}
    for i in range(WARM_UP + runs):
        sent = datetime.now(UTC)
        t = time.perf_counter()
        run_id = await start(c, doc["procedure_id"])
        posted_ms = (time.perf_counter() - t) * 1000
        answered = datetime.now(UTC)
        await ends.wait(run_id)
        events = await run_events(p.nats_url, run_id)
        started = node_started(events, "first")
        if i >= WARM_UP:
            milestones(events, sent, "first", steps)
            out["post_ms"].append(posted_ms)
            out["response_to_node_started_ms"].append(ms_since(started, answered))
            out["post_to_node_started_ms"].append(ms_since(started, sent))
    return out, steps


async def approval_latency(p: Any, ends: Completions, runs: int) -> tuple[dict[str, list[float]],
                                                                         dict[str, list[float]]]:
    c = p.client
    doc = approval_procedure()
    await import_procedure(c, doc)
    out: dict[str, list[float]] = {"decision_post_ms": [], "response_to_node_started_ms": [],
                                   "decision_to_node_started_ms": []}
    steps: dict[str, list[float]] = {}
    for i in range(WARM_UP + runs):
        run_id = await start(c, doc["procedure_id"])
        approval = await pending_approval(c, run_id)
        sent = datetime.now(UTC)
        t = time.perf_counter()
        r = await c.post(f"/api/approvals/{approval['approval_id']}/decision", json={"decision": "approved"})
        posted_ms = (time.perf_counter() - t) * 1000
        answered = datetime.now(UTC)
        assert r.status_code == 200, r.text
        await ends.wait(run_id)
        events = await run_events(p.nats_url, run_id)
        started = node_started(events, "after")
        if i >= WARM_UP:
            milestones(events, sent, "after", steps)
            out["decision_post_ms"].append(posted_ms)
            out["response_to_node_started_ms"].append(ms_since(started, answered))
            out["decision_to_node_started_ms"].append(ms_since(started, sent))
    return out, steps


def timeline(events: dict[str, list[float]]) -> dict[str, float]:
    """Median ms after the request of each event type, in that order."""
    medians = {kind: round(stats(times)["median"], 1) for kind, times in events.items()}
    return dict(sorted(medians.items(), key=lambda item: item[1]))


async def jetstream_hop(nats_url: str, n: int = 100) -> list[float]:
    """``js.publish`` (awaiting the ack) → delivery to a push consumer of the same stream, per message (ms)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH_LATENCY", subjects=["bench.latency.>"])
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def on_message(msg: Any) -> None:
        arrived.put_nowait(time.perf_counter())
        await msg.ack()

    sub = await js.subscribe("bench.latency.>", cb=on_message)
    times: list[float] = []
    try:
        for i in range(n + 10):
            t = time.perf_counter()
            await js.publish(f"bench.latency.{i}", b"x")
            got = await asyncio.wait_for(arrived.get(), 10)
            if i >= 10:
                times.append((got - t) * 1000)
    finally:
        await sub.unsubscribe()
        await js.delete_stream("BENCH_LATENCY")
        await nc.close()
    return times


async def empty_endpoint(n: int = 100) -> list[float]:
    """An empty FastAPI endpoint's round trip under uvicorn, per request (ms)."""
    app = FastAPI()

    @app.post("/nothing")
    async def nothing() -> dict[str, str]:
        return {}

    times: list[float] = []
    async with serve_app(app, what="the empty endpoint") as base_url, httpx.AsyncClient(base_url=base_url) as c:
        for i in range(n + 10):
            t = time.perf_counter()
            r = await c.post("/nothing", json={})
            if i >= 10:
                times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200
    return times


async def bench(nats_url: str, db: str, runs: int, approvals: int) -> dict[str, Any]:
    async with platform_of(nats_url, db) as p, Completions(nats_url) as ends:
        started, start_events = await run_start_latency(p, ends, runs)
        decided, decision_events = await approval_latency(p, ends, approvals)
        hop = await jetstream_hop(nats_url)
        endpoint = await empty_endpoint()
    a, b = stats(started["response_to_node_started_ms"]), stats(decided["response_to_node_started_ms"])
    hop_s, endpoint_s = stats(hop), stats(endpoint)
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "a_run_start": {
            "procedure": "sequence node (one log step) -> terminate",
            "runs": runs,
            "post_api_runs_ms": stats(started["post_ms"]),
            "response_to_first_node_started_ms": a,
            "request_to_first_node_started_ms": stats(started["post_to_node_started_ms"]),
            "run_events_ms_after_request_median": timeline(start_events),
            "goal_ms": 50,
            "ratio_to_jetstream_hop": round(a["median"] / hop_s["median"], 1),
            "ratio_to_empty_endpoint": round(a["median"] / endpoint_s["median"], 1),
        },
        "b_approval_decision": {
            "procedure": "human_approval -> sequence node (one log step) -> terminate; decided approved",
            "runs": approvals,
            "post_decision_ms": stats(decided["decision_post_ms"]),
            "response_to_next_node_started_ms": b,
            "request_to_next_node_started_ms": stats(decided["decision_to_node_started_ms"]),
            "run_events_ms_after_request_median": timeline(decision_events),
            "goal_p50_ms": 50,
            "ratio_to_jetstream_hop": round(b["median"] / hop_s["median"], 1),
            "ratio_to_empty_endpoint": round(b["median"] / endpoint_s["median"], 1),
        },
        "baseline_jetstream_publish_to_push_delivery_ms": hop_s,
        "baseline_empty_fastapi_endpoint_round_trip_ms": endpoint_s,
        "note": "gateway, compiler, runtime, approvals service and the bench share one process and event loop; times "
                "end at the node_started event's timestamp",
    }


async def main(runs: int, approvals: int) -> dict[str, Any]:
    async with bench_servers("lo_bench_latency") as (nats_url, db):
        return await bench(nats_url, db, runs, approvals)


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--approvals", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps({**loops.run(main(args.runs, args.approvals)), "event_loop": loops.chosen()}, indent=2))
