"""The run page's timeline filters (api.md §17): by group of event types and by node, kept in the URL query
(``?group=steps&group=errors&node=fetch``) so a filtered timeline is a link one can share.

The history is filtered by the API (``GET /api/runs/{id}/events`` with ``event_type`` and ``node_id``); the live
events that follow arrive unfiltered over the run's SSE stream, and the page's script
(``static/console/timeline_filter.js``) drops those the filter excludes, from the types and node the page carries
in ``data-filter-types`` and ``data-filter-node``. A type no group names (a newer one) shows only unfiltered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

from langorch_gateway.ui.console import Console, path_id

LIFECYCLE = ("run_created", "execution_started", "execution_recovered", "execution_resumed", "recovery_started",
             "run_suspended", "run_cancel_requested", "run_canceled", "run_retry_requested", "run_completed",
             "run_failed", "run_deleted", "checkpoint_saved")
STEPS = ("node_started", "node_completed", "node_error", "node_paused", "step_started", "step_completed",
         "step_replayed", "step_failed", "step_retrying", "step_timeout", "step_escalated", "step_error_notification",
         "step_test_override_applied", "step_mock_applied", "dry_run_step_skipped", "screenshot_requested",
         "artifact_created", "log", "template_warning", "pool_saturated", "rate_limit_wait", "validation_failed",
         "verification_warning", "notification_requested", "audit_log", "loop_started", "loop_iteration",
         "loop_iteration_failed", "loop_completed", "parallel_started", "parallel_branch_completed",
         "parallel_merge_conflict", "parallel_completed", "subflow_started", "subflow_completed", "subflow_failed",
         "workflow_delegated", "workflow_callback_received", "callback_timed_out", "llm_usage", "llm_route_selected",
         "budget_exceeded", "sla_breached")
APPROVALS = ("approval_requested", "approval_decision_received", "approval_auto_resolved")
ERRORS = ("node_error", "step_failed", "run_failed", "step_timeout", "step_error_notification",
          "loop_iteration_failed", "parallel_merge_conflict", "subflow_failed", "callback_timed_out",
          "budget_exceeded", "sla_breached", "validation_failed")
# the groups a visitor picks from, in the order the form shows them; a type may be in more than one
GROUPS: dict[str, tuple[str, ...]] = {"steps": STEPS, "approvals": APPROVALS, "errors": ERRORS,
                                      "lifecycle": LIFECYCLE}


@dataclass(frozen=True)
class TimelineFilter:
    """What the timeline shows: events of the chosen groups (all when none is chosen) at one node (or any)."""

    groups: tuple[str, ...] = ()
    node: str = ""

    @property
    def active(self) -> bool:
        return bool(self.groups or self.node)

    @property
    def types(self) -> list[str]:
        """The event types the chosen groups cover (empty: every type)."""
        return sorted({t for g in self.groups for t in GROUPS[g]})

    def api_params(self) -> dict[str, Any]:
        """The events API's filters for this one."""
        return {"event_type": ",".join(self.types) or None, "node_id": self.node or None}

    def query(self) -> str:
        """The URL query that shows this filter (empty when nothing is filtered)."""
        return urlencode([*(("group", g) for g in self.groups), *((("node", self.node),) if self.node else ())])


def from_query(query: QueryParams) -> TimelineFilter:
    """The filter a URL asks for; unknown groups are ignored (the form only offers the known ones)."""
    groups = tuple(g for g in GROUPS if g in query.getlist("group"))
    return TimelineFilter(groups=groups, node=query.get("node", "").strip())


async def last_event(ui: Console, run_id: str) -> dict[str, Any] | None:
    """The run's latest event so far (two small reads: the count, then the last one)."""
    path = f"/api/runs/{path_id(run_id)}/events"
    total = (await ui.get(path, {"limit": 1}))["total"]
    if not total:
        return None
    items: list[dict[str, Any]] = (await ui.get(path, {"limit": 1, "offset": total - 1}))["items"]
    return items[-1] if items else None


def last_position(events: Sequence[Mapping[str, Any]], whole: Mapping[str, Any] | None) -> tuple[int, int]:
    """Where the live stream takes over from a filtered history: the run's last event read before the history
    (``whole``) or the history's own last event, whichever is later — as ``(seq, stream_seq)``. Events between
    the two that the history left out are ones the filter excludes, so the live page drops them anyway."""
    seqs = [(e["seq"], e["stream_seq"]) for e in events]
    if whole is not None:
        seqs.append((whole["seq"], whole["stream_seq"]))
    return max(seqs, default=(0, 0))
