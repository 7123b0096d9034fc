"""api.md §13: GET /metrics (Prometheus text from the gateway's registry, ◆ gauges from projections) and
GET /api/metrics/summary computed from the projections, KV leases and the runtime's consumer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ckp_core.events import ANONYMOUS, EventEnvelope
from ckp_core.subjects import LEASES_BUCKET, lease_key
from langorch_infra.jetstream import JetStreamEventStore, connect
from tests.agent_server import running_agent
from tests.helpers import (
    Platform,
    approval_when,
    decide,
    follow_run,
    pending_approval,
    platform_of,
    procedure_doc,
    start_run,
)
from tests.test_approvals_end_to_end import APPROVE_REJECT, TIMED

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        yield p


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_prometheus_exposition(platform: Platform) -> None:
    c = platform.client
    r = await c.post("/api/procedures", json={"ckp_json": procedure_doc("metrics_proc")})
    assert r.status_code == 201
    assert (await c.get("/api/procedures/metrics_proc/9.9.9")).status_code == 404
    assert (await c.patch("/api/procedures/metrics_proc/1.0.0/status", json={"status": "deprecated"})).status_code \
        == 409
    run = (await c.post("/api/runs", json={"procedure_id": "metrics_proc", "procedure_version": "1.0.0"})).json()
    _, end = await follow_run(c, run["run_id"])
    assert end == "completed"
    await platform.app.state.projector.catch_up()

    r = await c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    got = samples(r.text)
    route = "/api/procedures/{procedure_id}/{version}"
    assert got[("langorch_http_requests_total", (("method", "GET"), ("route", route), ("status", "404")))] == 1
    assert got[("langorch_http_request_duration_seconds_count", (("method", "GET"), ("route", route)))] == 1
    assert got[("langorch_commands_total", (("command_type", "import_procedure"), ("outcome", "accepted")))] == 1
    assert got[("langorch_commands_total", (("command_type", "set_procedure_status"), ("outcome", "rejected")))] == 1
    assert got[("langorch_runs", (("status", "completed"),))] == 1
    assert got[("langorch_runs", (("status", "running"),))] == 0
    for projection in ("runs", "approvals", "run_artifacts"):
        assert got[("langorch_projection_lag_events", (("projection", projection),))] == 0
    assert ("langorch_projection_lag_events", (("projection", "audit_log"),)) in got
    assert got[("langorch_build_info", (("service", "gateway"), ("version", "0.1.0")))] == 1
    assert got[("langorch_auth_disabled", ())] == 1
    assert got[("langorch_read_your_writes_wait_seconds_count", ())] >= 2
    assert got[("langorch_sse_connections", (("stream", "run"),))] == 0  # the stream above has ended
    alias = await c.get("/api/metrics")
    assert alias.status_code == 200
    assert "langorch_runs" in alias.text


async def test_metrics_token(module_nats_url: str, module_database_url: str) -> None:
    async with platform_of(module_nats_url, module_database_url, runtime=False, agents=False,
                           gateway_settings={"metrics_token": "s3cret-metrics"}) as p:
        r = await p.client.get("/metrics")
        assert r.status_code == 401
        assert r.json()["code"] == "unauthenticated"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = await p.client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"})
        assert r.status_code == 200


async def test_summary_from_projections(platform: Platform) -> None:
    c = platform.client
    await c.post("/api/procedures", json={"ckp_json": procedure_doc("summary_proc")})
    run_ids = []
    for _ in range(2):
        run = (await c.post("/api/runs", json={"procedure_id": "summary_proc", "procedure_version": "1.0.0"})).json()
        _, end = await follow_run(c, run["run_id"])
        assert end == "completed"
        run_ids.append(run["run_id"])
    async with running_agent() as agent:
        for i, status in enumerate(("online", "draining")):
            r = await c.post("/api/agents", json={"agent_id": f"sum{i}", "name": f"s{i}", "channel": "sum",
                                                  "base_url": agent.base_url, "capabilities": ["a"]})
            assert r.status_code == 201, r.text
            assert (await c.patch(f"/api/agents/sum{i}", json={"status": status})).status_code == 200
    nc = await connect(platform.nats_url, "test-summary")
    try:
        js = nc.jetstream()
        kv = await js.key_value(LEASES_BUCKET)
        lease = {"lease_id": "L-1", "resource_key": "sum0", "slot": 0, "agent_id": "sum0", "pool_id": "sum_default",
                 "run_id": run_ids[0], "node_id": "n", "step_id": "s", "holder": "rt", "acquired_at": None,
                 "renewed_at": None, "expires_at": None}
        await kv.create(lease_key("sum0", 0), json.dumps(lease).encode())
        store = JetStreamEventStore(js)
        head = await store.head("run", run_ids[1])
        assert head is not None
        usage = EventEnvelope(type="llm_usage", aggregate="run", aggregate_id=run_ids[1], seq=head.seq + 1,
                              actor=ANONYMOUS, data={"model": "m", "prompt_tokens": 11, "completion_tokens": 4,
                                                     "total_tokens": 15, "estimated_cost_usd": 0.02})
        [position] = await store.append([usage], expected_position=head.position)
    finally:
        await nc.close()
    await platform.app.state.projector.wait(position, 5)

    r = await c.get("/api/metrics/summary", params={"window_hours": 1})
    assert r.status_code == 200, r.text
    s: dict[str, Any] = r.json()
    assert set(s) == {"generated_at", "window_hours", "runs", "steps", "approvals", "agents", "leases", "triggers",
                      "llm", "queue", "projections"}
    assert s["window_hours"] == 1
    runs = (await c.get("/api/runs", params={"limit": 500})).json()["items"]
    assert s["runs"]["by_status"] == {"completed": len(runs)}
    assert (s["runs"]["started"], s["runs"]["completed"], s["runs"]["failed"]) == (len(runs), len(runs), 0)
    assert s["runs"]["success_rate"] == 1.0
    durations = s["runs"]["duration_seconds"]
    assert 0 <= durations["p50"] <= durations["p95"] <= durations["max"]
    events = []
    for run in runs:
        events += (await c.get(f"/api/runs/{run['run_id']}/events", params={"limit": 500})).json()["items"]
    assert s["steps"]["completed"] == sum(1 for e in events if e["event_type"] == "step_completed") > 0
    assert s["steps"]["failed"] == sum(1 for e in events if e["event_type"] == "step_failed")
    assert s["agents"] == {"online": 1, "offline": 0, "draining": 1, "circuit_open": 0}
    assert s["leases"] == {"active": 1, "saturated_pools": ["sum_default"]}
    assert s["llm"] == {"requests": 1, "prompt_tokens": 11, "completion_tokens": 4, "estimated_cost_usd": 0.02}
    assert s["approvals"] == {"pending": 0, "decided": 0, "timed_out": 0,
                              "decision_latency_seconds": {"p50": None, "p95": None}}
    assert s["triggers"] == {"fired": 0, "rejected": {}}
    assert s["queue"] == {"run_queue_depth": 0}
    assert s["projections"]["max_lag_events"] >= 0
    for bad in (0, 721, "x"):
        r = await c.get("/api/metrics/summary", params={"window_hours": bad})
        assert r.status_code == 422
        assert list(r.json()["errors"]) == ["query.window_hours"]


async def test_summary_and_gauge_count_approvals(nats_url: str, database_url: str) -> None:
    """One approval decided by a person, one expired (auto_reject) and one still pending, as §13.2 and the
    ``langorch_approvals_pending`` gauge of §13.1 report them."""
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        for doc in (APPROVE_REJECT, TIMED["t_reject"]):
            assert (await c.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
        decided = await pending_approval(c, await start_run(c, "ar"))
        assert (await decide(c, decided["approval_id"], decision="approved")).status_code == 200
        expired = await pending_approval(c, await start_run(c, "t_reject"))
        await approval_when(c, expired["approval_id"], "timed_out")
        await pending_approval(c, await start_run(c, "ar"))
        s = (await c.get("/api/metrics/summary", params={"window_hours": 1})).json()["approvals"]
        exposition = (await c.get("/metrics")).text
    assert (s["pending"], s["decided"], s["timed_out"]) == (1, 1, 1)
    latency = s["decision_latency_seconds"]
    assert 0 <= latency["p50"] <= latency["p95"]
    assert "langorch_approvals_pending 1.0" in exposition
