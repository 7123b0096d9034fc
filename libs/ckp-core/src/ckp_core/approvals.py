"""The approval aggregate (api.md §6): state folded from its events, the decision rules of §6.3, the timeout
table of §6.4 and the ``ApprovalOut`` view.

The approvals service decides with these functions and the gateway folds its approval stream with the same
``evolve``, so a streamed ``ApprovalOut`` never disagrees with the service's view of the aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ckp_core.errors import CommandRefused, InvalidInputVars
from ckp_core.events import EventEnvelope, format_time
from ckp_core.variables import VariableSpec, validate_inputs

STATUSES = ("pending", "approved", "rejected", "decided", "timed_out", "escalated", "canceled")
DECISION_TYPES = ("approve_reject", "select_option", "provide_input")
EXPIRED_STATUSES = frozenset({"timed_out", "escalated"})
DECISION_ALIASES = {"approve": "approved", "reject": "rejected"}
TIMEOUT_ACTOR = "system:approvals"


@dataclass
class ApprovalState:
    """One approval as its events leave it; ``exists`` is False until ``approval_requested``."""

    approval_id: str
    seq: int = 0
    position: int = 0
    exists: bool = False
    run_id: str | None = None
    procedure_id: str | None = None
    procedure_version: str | None = None
    node_id: str | None = None
    node_name: str | None = None
    project_id: str | None = None
    prompt: str = ""
    context_data: Any = None
    decision_type: str = "approve_reject"
    options: list[str] = field(default_factory=list)
    input_schema: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    decision: str | None = None
    decided_by: str | None = None
    decided_at: str | None = None
    comment: str | None = None
    decision_payload: Any = None
    created_at: str | None = None
    expires_at: str | None = None
    timeout_action: str | None = None
    escalation_contact: str | None = None
    approval_level: str | None = None
    updated_at: str | None = None

    @property
    def pending(self) -> bool:
        return self.exists and self.status == "pending"

    def expires(self) -> datetime | None:
        return parse_time(self.expires_at)


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 string (``Z`` or offset) as an aware datetime; None when absent."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def normalise_time(value: Any) -> str | None:
    """The canonical rendering (api.md §1.1) of an RFC 3339 string, as the projection would render it."""
    parsed = parse_time(value)
    return format_time(parsed) if parsed is not None else None


def evolve(state: ApprovalState, ev: EventEnvelope, position: int) -> None:
    """Apply one event of the approval aggregate."""
    d = ev.data
    state.seq, state.position = ev.seq, position
    state.updated_at = format_time(ev.occurred_at)
    if ev.type == "approval_requested":
        state.exists = True
        state.status = "pending"
        for name in ("run_id", "procedure_id", "procedure_version", "node_id", "node_name", "project_id",
                     "expires_at", "timeout_action", "escalation_contact", "approval_level"):
            setattr(state, name, d.get(name))
        state.prompt = str(d.get("prompt") or "")
        state.context_data = d.get("context_data")
        state.decision_type = str(d.get("decision_type") or "approve_reject")
        state.options = list(d.get("options") or [])
        state.input_schema = dict(d.get("input_schema") or {})
        state.expires_at = normalise_time(d.get("expires_at"))
        state.created_at = format_time(ev.occurred_at)
    elif ev.type in ("approval_decided", "approval_timed_out"):
        state.status = str(d["status"])
        state.decision = d.get("decision")
        state.decided_by = d.get("decided_by")
        state.decided_at = normalise_time(d.get("decided_at"))
        state.comment = d.get("comment")
        state.decision_payload = d.get("payload")
    elif ev.type == "approval_canceled":
        state.status = "canceled"


def fold(approval_id: str, events: Iterable[tuple[EventEnvelope, int]]) -> ApprovalState:
    state = ApprovalState(approval_id)
    for ev, position in events:
        evolve(state, ev, position)
    return state


def allowed_decisions(state: ApprovalState) -> list[str]:
    """The decisions §6.3 accepts for the approval's ``decision_type``."""
    if state.decision_type == "select_option":
        return list(state.options)
    return ["approved", "rejected"]


def normalise_decision(decision: str) -> str:
    """The canonical spelling of a decision (``approve`` → ``approved``, api.md §1.8)."""
    return DECISION_ALIASES.get(decision, decision)


def check_decision(state: ApprovalState, decision: str, payload: Any, now: datetime) -> tuple[str, str, Any]:
    """Validate a principal's decision; returns (status after, decision, stored payload) or raises
    ``CommandRefused`` with the stable problem code of api.md §6.2."""
    if not state.exists:
        raise CommandRefused("not_found", f"approval {state.approval_id} not found", resource="approval")
    if state.status in EXPIRED_STATUSES:
        raise CommandRefused("approval_expired", f"approval {state.approval_id} expired at {state.expires_at}",
                             current_status=state.status)
    if state.status != "pending":
        raise CommandRefused("approval_not_pending", f"approval {state.approval_id} is {state.status}",
                             current_status=state.status)
    expires = state.expires()
    if expires is not None and expires <= now:
        raise CommandRefused("approval_expired", f"approval {state.approval_id} expired at {state.expires_at}",
                             current_status=state.status)
    decision = normalise_decision(decision)
    allowed = allowed_decisions(state)
    if decision not in allowed:
        raise CommandRefused("invalid_decision", f"decision {decision!r} is not valid for a {state.decision_type} "
                             "approval", allowed=allowed, errors={"decision": [f"Must be one of: "
                                                                               f"{', '.join(allowed)}"]})
    if state.decision_type == "select_option":
        return "decided", decision, payload
    if state.decision_type == "provide_input" and decision == "approved":
        return decision, decision, validate_payload(state.input_schema, payload)
    return decision, decision, payload


def validate_payload(schema: Mapping[str, Any], payload: Any) -> dict[str, Any]:
    """A ``provide_input`` payload checked (and coerced) against the node's flat ``input_schema``; errors are
    reported at ``payload.<name>``."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise CommandRefused("validation_failed", "payload must be an object", errors={"payload": ["Must be an "
                                                                                                "object"]})
    specs = {name: VariableSpec.model_validate(spec | {"has_default": "default" in spec})
             for name, spec in schema.items() if isinstance(spec, dict)}
    try:
        return validate_inputs(specs, payload)
    except InvalidInputVars as exc:
        errors = {"payload." + key.removeprefix("input_vars."): messages for key, messages in exc.errors.items()}
        n = len(errors)
        raise CommandRefused("validation_failed", f"{n} payload field{'s' if n != 1 else ''} failed validation",
                             errors=errors) from exc


def timeout_outcome(timeout_action: str | None) -> tuple[str, str]:
    """(status, decision) of an expiry per the table of api.md §6.4."""
    if timeout_action == "auto_approve":
        return "timed_out", "approved"
    if timeout_action == "auto_reject":
        return "timed_out", "rejected"
    if timeout_action == "escalate":
        return "escalated", "timeout"
    return "timed_out", "timeout"


def resolution(state: ApprovalState, source: str) -> dict[str, Any]:
    """``ResumeRun.resolution`` for a decided or expired approval (ckp.md §3.13 step 2)."""
    return {"wait_id": state.approval_id, "approval_id": state.approval_id, "status": state.status,
            "decision": state.decision, "decided_by": state.decided_by, "decided_at": state.decided_at,
            "comment": state.comment, "payload": state.decision_payload, "source": source}


def approval_view(state: ApprovalState, run_status: str | None = None) -> dict[str, Any]:
    """``ApprovalOut`` (api.md §6.1) of the state; the caller redacts and adds ``run_status``."""
    return {
        "approval_id": state.approval_id, "run_id": state.run_id, "procedure_id": state.procedure_id,
        "procedure_version": state.procedure_version, "node_id": state.node_id, "node_name": state.node_name,
        "project_id": state.project_id, "prompt": state.prompt, "context_data": state.context_data,
        "decision_type": state.decision_type,
        "options": list(state.options) if state.decision_type == "select_option" else [],
        "input_schema": dict(state.input_schema), "status": state.status, "decision": state.decision,
        "decided_by": state.decided_by, "decided_at": state.decided_at, "comment": state.comment,
        "decision_payload": state.decision_payload, "created_at": state.created_at, "expires_at": state.expires_at,
        "timeout_action": state.timeout_action, "escalation_contact": state.escalation_contact,
        "approval_level": state.approval_level, "run_status": run_status,
    }
