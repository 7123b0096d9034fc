"""Prometheus metrics of the gateway (api.md §13.1) and the JSON summary computed from projections (§13.2).

One ``CollectorRegistry`` per application (no module-level globals). Gauges marked ◆ in the spec
(``langorch_runs``) and the projection lag are computed from PostgreSQL / JetStream at scrape time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ckp_core import runs
from ckp_core.events import format_time
from ckp_core.subjects import COMMAND_STREAM
from langorch_infra.bus import BusMetrics
from langorch_infra.jetstream import stream_last_position
from langorch_infra.metrics import combined_registry, register_build_info

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROJECTIONS = ("procedures", "procedure_deployments", "projects", "agents", "runs", "run_events", "approvals",
               "run_artifacts", "users", "api_keys")
RUNTIME_CONSUMER = "runtime"


class GatewayMetrics:
    """The gateway's metric families, registered in their own registry.

    ``extra`` registries (the other services of a ``langorch up`` process) are served with it as one registry.
    """

    def __init__(self, version: str, extra: Sequence[CollectorRegistry] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.exposed = combined_registry([r, *extra]) if extra else r
        register_build_info(r, "gateway", version)
        self.http_requests = Counter("langorch_http_requests", "HTTP requests answered.",
                                     ["method", "route", "status"], registry=r)
        self.http_duration = Histogram("langorch_http_request_duration_seconds", "HTTP request duration.",
                                       ["method", "route"], registry=r)
        self.sse = Gauge("langorch_sse_connections", "Open SSE streams.", ["stream"], registry=r)
        self.projection_lag = Gauge("langorch_projection_lag_events", "Stream head minus applied position.",
                                    ["projection"], registry=r)
        self.ryw_wait = Histogram("langorch_read_your_writes_wait_seconds", "Waits for a projection to reach a "
                                  "position.", registry=r, buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.commands = Counter("langorch_commands", "Commands published, by outcome.", ["command_type", "outcome"],
                                registry=r)
        # set by create_app: 1 in auth-disabled mode (api.md §2.4), else 0
        self.auth_disabled = Gauge("langorch_auth_disabled", "1 while authentication is disabled.", registry=r)
        self.auth_disabled.set(1)
        self.bus = BusMetrics(r, "gateway")  # projector messages; the gateway has no pull consumer
        self.runs = Gauge("langorch_runs", "Runs by status (from the runs projection).", ["status"], registry=r)
        self.approvals_pending = Gauge("langorch_approvals_pending", "Pending approvals (from the approvals "
                                       "projection).", registry=r)
        self.webhook_requests = Counter("langorch_webhook_requests", "Webhook intake requests, by outcome "
                                        "(accepted, pending, invalid_signature, stale_signature, too_large, "
                                        "unsupported_media, invalid_input, duplicate, throttled, not_found, "
                                        "refused).", ["outcome"], registry=r)
        self.admission_backlog = Gauge("langorch_admission_backlog", "Run commands waiting for the runtime, as "
                                       "admission control last read them.", registry=r)
        self.admission_refusals = Counter("langorch_admission_refusals", "Run creations refused with 429 "
                                          "rate_limited by admission control.", registry=r)

    async def refresh(self, pool: asyncpg.Pool, js: JetStreamContext, applied: int,
                      audit_lag: int | None = None) -> None:
        """Set the projection-derived gauges just before a scrape (``audit_lag``: ``audit_log``'s own lag)."""
        counts = {r["status"]: int(r["n"]) for r in await pool.fetch(
            "SELECT status, count(*) AS n FROM runs GROUP BY status")}
        for status in sorted(set(runs.STATUSES) | set(counts)):
            self.runs.labels(status=status).set(counts.get(status, 0))
        self.approvals_pending.set(int(await pool.fetchval("SELECT count(*) FROM approvals WHERE status = 'pending'")))
        lag = max(0, await stream_last_position(js) - applied)
        for name in PROJECTIONS:  # all tables share the projector's one position
            self.projection_lag.labels(projection=name).set(lag)
        if audit_lag is not None:
            self.projection_lag.labels(projection="audit_log").set(audit_lag)

    def render(self) -> bytes:
        return generate_latest(self.exposed)


def _num(value: Any) -> float | None:
    return float(value) if value is not None else None


async def run_queue_depth(js: JetStreamContext) -> int:
    """Pending start/resume messages of the runtime's durable consumer (0 when it does not exist yet)."""
    try:
        info = await js.consumer_info(COMMAND_STREAM, RUNTIME_CONSUMER)
    except NotFoundError:
        return 0
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def summary(pool: asyncpg.Pool, js: JetStreamContext, applied: int, window_hours: int,
                  leases: list[dict[str, Any]]) -> dict[str, Any]:
    """``GET /api/metrics/summary`` (api.md §13.2) from the projections, KV leases and the runtime consumer.

    The triggers section reports zeros until a triggers service exists. Approvals: ``pending`` is the current count;
    ``decided`` counts human decisions (``approved``, ``rejected``, ``decided``) and ``timed_out`` expiries
    (``timed_out``, ``escalated``) within the window, with the request-to-outcome latency of both.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        by_status = {r["status"]: int(r["n"]) for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM runs WHERE created_at >= now() - make_interval(hours => $1) "
            "GROUP BY status",
            window_hours)}
        started = int(await conn.fetchval(
            "SELECT count(*) FROM runs WHERE started_at >= now() - make_interval(hours => $1)", window_hours))
        ended = {r["status"]: int(r["n"]) for r in await conn.fetch(
            """SELECT status, count(*) AS n FROM runs WHERE ended_at >= now() - make_interval(hours => $1)
                AND status = ANY($2::text[]) GROUP BY status""", window_hours, list(runs.TERMINAL_STATUSES))}
        durations = await conn.fetchrow(
            """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
                       percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95, max(d) AS max
                FROM (SELECT extract(epoch FROM ended_at - started_at) AS d FROM runs
                      WHERE ended_at >= now() - make_interval(hours => $1) AND started_at IS NOT NULL) x""",
            window_hours)
        steps = {r["event_type"]: int(r["n"]) for r in await conn.fetch(
            """SELECT event_type, count(*) AS n FROM run_events WHERE created_at >= now() - make_interval(hours => $1)
                AND event_type IN ('step_completed', 'step_failed', 'step_replayed') GROUP BY event_type""",
            window_hours)}
        llm = await conn.fetchrow(
            """SELECT count(*) AS requests, COALESCE(sum((payload->>'prompt_tokens')::bigint), 0) AS prompt,
                       COALESCE(sum((payload->>'completion_tokens')::bigint), 0) AS completion,
                       COALESCE(sum((payload->>'estimated_cost_usd')::numeric), 0) AS cost
                FROM run_events WHERE event_type = 'llm_usage' AND created_at >= now() - make_interval(hours => $1)""",
            window_hours)
        approvals = await conn.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                      count(*) FILTER (WHERE status IN ('approved', 'rejected', 'decided') AND decided_at >= since)
                        AS decided,
                      count(*) FILTER (WHERE status IN ('timed_out', 'escalated') AND decided_at >= since)
                        AS timed_out,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM decided_at - created_at))
                        FILTER (WHERE status <> 'pending' AND status <> 'canceled' AND decided_at >= since) AS p50,
                      percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM decided_at - created_at))
                        FILTER (WHERE status <> 'pending' AND status <> 'canceled' AND decided_at >= since) AS p95
               FROM approvals, (SELECT now() - make_interval(hours => $1) AS since) w""", window_hours)
        agents = {r["status"]: int(r["n"]) for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM agents GROUP BY status")}
        circuit_open = int(await conn.fetchval("SELECT count(*) FROM agents WHERE circuit_state = 'open'"))
        pools = await conn.fetch(
            """SELECT pool_id, array_agg(agent_id) AS ids,
                      COALESCE(sum(concurrency_limit) FILTER (WHERE status = 'online' AND circuit_state <> 'open'), 0)
                        AS usable_slots,
                      array_agg(agent_id) FILTER (WHERE status = 'online' AND circuit_state <> 'open') AS usable_ids
               FROM agents GROUP BY pool_id ORDER BY pool_id""")
    assert durations is not None
    assert llm is not None
    assert approvals is not None
    finished = sum(ended.values())
    active = [x for x in leases if x["is_active"]]
    saturated = []
    for p in pools:
        held = [x for x in active if x.get("pool_id") == p["pool_id"] or x.get("agent_id") in (p["ids"] or [])]
        busy = sum(1 for x in held if x.get("agent_id") in (p["usable_ids"] or []))
        if held and int(p["usable_slots"]) - busy <= 0:  # nothing free for a new step (same rule as /pools)
            saturated.append(p["pool_id"])
    head = await stream_last_position(js)
    return {
        "generated_at": format_time(datetime.now(UTC)), "window_hours": window_hours,
        "runs": {"by_status": by_status, "started": started, "completed": ended.get("completed", 0),
                 "failed": ended.get("failed", 0), "canceled": ended.get("canceled", 0),
                 "success_rate": round(ended.get("completed", 0) / finished, 4) if finished else None,
                 "duration_seconds": {"p50": _num(durations["p50"]), "p95": _num(durations["p95"]),
                                      "max": _num(durations["max"])}},
        "steps": {"completed": steps.get("step_completed", 0), "failed": steps.get("step_failed", 0),
                  "replayed": steps.get("step_replayed", 0)},
        "approvals": {"pending": int(approvals["pending"]), "decided": int(approvals["decided"]),
                      "timed_out": int(approvals["timed_out"]),
                      "decision_latency_seconds": {"p50": _num(approvals["p50"]), "p95": _num(approvals["p95"])}},
        "agents": {"online": agents.get("online", 0), "offline": agents.get("offline", 0),
                   "draining": agents.get("draining", 0), "circuit_open": circuit_open},
        "leases": {"active": len(active), "saturated_pools": saturated},
        # no triggers service exists yet
        "triggers": {"fired": 0, "rejected": {}},
        "llm": {"requests": int(llm["requests"]), "prompt_tokens": int(llm["prompt"]),
                "completion_tokens": int(llm["completion"]), "estimated_cost_usd": float(llm["cost"])},
        "queue": {"run_queue_depth": await run_queue_depth(js)},
        "projections": {"max_lag_events": max(0, head - applied)},
    }
