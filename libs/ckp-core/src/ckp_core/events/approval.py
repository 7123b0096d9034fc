"""Events of the approval aggregate (owned by the approvals service; api.md §6).

The aggregate's first event is ``approval_requested``, the payload the run writes too (:mod:`ckp_core.events.run`).
"""

from __future__ import annotations

from typing import Any

from ckp_core.events.envelope import EventData


class ApprovalDecided(EventData):
    """Approval aggregate: a principal decided (api.md §6.3)."""

    TYPE = "approval_decided"
    AGGREGATE = "approval"
    approval_id: str
    run_id: str
    status: str
    decision: str
    decided_by: str
    decided_at: str
    comment: str | None = None
    payload: Any = None


class ApprovalTimedOut(EventData):
    """Approval aggregate: ``expires_at`` passed (api.md §6.4)."""

    TYPE = "approval_timed_out"
    AGGREGATE = "approval"
    approval_id: str
    run_id: str
    status: str
    decision: str
    decided_by: str = "system:approvals"
    decided_at: str
    timeout_action: str | None = None


class ApprovalCanceled(EventData):
    """Approval aggregate: its run ended while it was pending."""

    TYPE = "approval_canceled"
    AGGREGATE = "approval"
    approval_id: str
    run_id: str
    reason: str | None = None


EVENTS: tuple[type[EventData], ...] = (ApprovalDecided, ApprovalTimedOut, ApprovalCanceled)
