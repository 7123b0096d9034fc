"""Approvals metrics (api.md §13.1), derived from the approval events this replica appends (so they match the
timelines and stay per process): requests by decision type, decisions and timeouts by the approval's status,
decision latency from request to decision, and approval timeouts as callback timeouts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from ckp_core.events import EventEnvelope
from langorch_infra.metrics import package_version, register_build_info

VERSION = package_version("langorch-approvals")
LATENCY_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600)
DECIDING = ("approval_decided", "approval_timed_out", "approval_canceled")

RequestedAt = Callable[[str], Awaitable[float | None]]


class ApprovalsMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        register_build_info(r, "approvals", VERSION)
        self.requests = Counter("langorch_approval_requests_total", "Approvals requested", ["decision_type"],
                                registry=r)
        self.decisions = Counter("langorch_approval_decisions_total", "Approvals decided, timed out or canceled, "
                                 "by resulting status", ["outcome"], registry=r)
        self.latency = Histogram("langorch_approval_decision_latency_seconds", "Request to decision or timeout",
                                 ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.callback_timeouts = Counter("langorch_callback_timeout_total", "Callbacks that timed out",
                                         ["callback_type"], registry=r)

    async def observe(self, event: EventEnvelope, requested_at: RequestedAt) -> None:
        """Count one appended approval event; ``requested_at`` finds when the approval was requested."""
        data = event.data
        if event.type == "approval_requested":
            self.requests.labels(decision_type=str(data.get("decision_type") or "approve_reject")).inc()
            return
        if event.type not in DECIDING:
            return
        outcome = "canceled" if event.type == "approval_canceled" else str(data.get("status") or "unknown")
        self.decisions.labels(outcome=outcome).inc()
        if event.type == "approval_timed_out":
            self.callback_timeouts.labels(callback_type="approval").inc()
        if event.type != "approval_canceled":
            started = await requested_at(event.aggregate_id)
            if started is not None:
                self.latency.labels(outcome=outcome).observe(max(0.0, event.occurred_at.timestamp() - started))
