"""The approval aggregate's pure rules (api.md §6.3, §6.4): fold, decision checks, timeout table, view."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ckp_core.approvals import (
    ApprovalState,
    approval_view,
    check_decision,
    fold,
    resolution,
    timeout_outcome,
    validate_payload,
)
from ckp_core.errors import CommandRefused
from ckp_core.events import (
    Actor,
    ApprovalCanceled,
    ApprovalDecided,
    ApprovalRequested,
    ApprovalTimedOut,
    EventEnvelope,
    format_time,
    make_event,
)

pytestmark = pytest.mark.unit

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
RUNTIME = Actor.system("runtime")


def requested(**fields: Any) -> EventEnvelope:
    data = {"approval_id": "a1", "run_id": "r1", "procedure_id": "p", "procedure_version": "1", "node_id": "review",
            "decision_type": "approve_reject", "prompt": "ok?"} | fields
    return make_event(ApprovalRequested(**data), aggregate_id="a1", seq=1, actor=RUNTIME, aggregate="approval")


def state_of(*events: EventEnvelope) -> ApprovalState:
    return fold("a1", ((e, i + 1) for i, e in enumerate(events)))


def refusal(state: ApprovalState, decision: str, payload: Any = None, now: datetime = NOW) -> CommandRefused:
    with pytest.raises(CommandRefused) as caught:
        check_decision(state, decision, payload, now)
    return caught.value


def test_fold_follows_request_decision_and_keeps_position() -> None:
    decided = make_event(ApprovalDecided(approval_id="a1", run_id="r1", status="approved", decision="approved",
                                         decided_by="user:alice", decided_at="2025-03-04T10:00:01Z", comment="ok",
                                         payload=None), aggregate_id="a1", seq=2, actor=Actor(kind="user", id="alice"))
    state = state_of(requested(expires_at="2025-03-04T11:00:00+00:00"), decided)
    assert (state.exists, state.status, state.decision, state.decided_by, state.comment) == (
        True, "approved", "approved", "user:alice", "ok")
    assert (state.seq, state.position) == (2, 2)
    # times are rendered canonically, whatever offset spelling the event used
    assert state.expires_at == "2025-03-04T11:00:00.000000Z"
    assert state.decided_at == "2025-03-04T10:00:01.000000Z"


def test_unknown_approval_is_not_found() -> None:
    assert refusal(ApprovalState("nope"), "approved").code == "not_found"


@pytest.mark.parametrize(("later", "code", "current"), [
    (ApprovalDecided(approval_id="a1", run_id="r1", status="rejected", decision="rejected", decided_by="anonymous",
                     decided_at="2025-03-04T10:00:00Z"), "approval_not_pending", "rejected"),
    (ApprovalCanceled(approval_id="a1", run_id="r1", reason="run failed"), "approval_not_pending", "canceled"),
    (ApprovalTimedOut(approval_id="a1", run_id="r1", status="timed_out", decision="timeout",
                      decided_at="2025-03-04T10:00:00Z"), "approval_expired", "timed_out"),
    (ApprovalTimedOut(approval_id="a1", run_id="r1", status="escalated", decision="timeout",
                      decided_at="2025-03-04T10:00:00Z"), "approval_expired", "escalated"),
])
def test_closed_approvals_refuse_decisions(later: Any, code: str, current: str) -> None:
    state = state_of(requested(), make_event(later, aggregate_id="a1", seq=2, actor=RUNTIME))
    refused = refusal(state, "approved")
    assert (refused.code, refused.extra["current_status"]) == (code, current)


def test_a_pending_approval_past_its_expiry_is_expired_before_the_timer_fires() -> None:
    state = state_of(requested(expires_at=format_time(NOW - timedelta(seconds=1))))
    assert refusal(state, "approved").code == "approval_expired"
    ok = state_of(requested(expires_at=format_time(NOW + timedelta(seconds=1))))
    assert check_decision(ok, "approve", None, NOW) == ("approved", "approved", None)


def test_approve_reject_accepts_two_decisions_and_their_aliases() -> None:
    state = state_of(requested())
    assert check_decision(state, "rejected", None, NOW)[:2] == ("rejected", "rejected")
    assert check_decision(state, "reject", None, NOW)[:2] == ("rejected", "rejected")
    refused = refusal(state, "maybe")
    assert (refused.code, refused.extra["allowed"]) == ("invalid_decision", ["approved", "rejected"])


def test_select_option_decides_one_of_the_options() -> None:
    state = state_of(requested(decision_type="select_option", options=["card", "cash"]))
    assert check_decision(state, "cash", {"note": 1}, NOW) == ("decided", "cash", {"note": 1})
    refused = refusal(state, "approved")
    assert (refused.code, refused.extra["allowed"]) == ("invalid_decision", ["card", "cash"])


SCHEMA = {"iban": {"type": "string", "required": True, "validation": {"regex": "DE[0-9]+"}},
          "days": {"type": "integer", "default": 14, "validation": {"min": 1, "max": 30}}}


def test_provide_input_validates_and_coerces_the_payload() -> None:
    state = state_of(requested(decision_type="provide_input", input_schema=SCHEMA))
    assert check_decision(state, "approved", {"iban": "DE12", "days": "3"}, NOW) == (
        "approved", "approved", {"iban": "DE12", "days": 3})
    # the default applies; a rejection needs no valid payload
    assert validate_payload(SCHEMA, {"iban": "DE1"}) == {"iban": "DE1", "days": 14}
    assert check_decision(state, "rejected", {"iban": 5}, NOW) == ("rejected", "rejected", {"iban": 5})
    refused = refusal(state, "approved", {"iban": "FR1", "days": 99})
    assert refused.code == "validation_failed"
    assert set(refused.extra["errors"]) == {"payload.iban", "payload.days"}
    assert refusal(state, "approved", None).extra["errors"] == {"payload.iban": ["This field is required"]}
    assert refusal(state, "approved", ["DE1"]).extra["errors"] == {"payload": ["Must be an object"]}


@pytest.mark.parametrize(("action", "expected"), [
    ("auto_approve", ("timed_out", "approved")), ("auto_reject", ("timed_out", "rejected")),
    ("escalate", ("escalated", "timeout")), (None, ("timed_out", "timeout")),
])
def test_timeout_table(action: str | None, expected: tuple[str, str]) -> None:
    assert timeout_outcome(action) == expected


def test_resolution_and_view_carry_the_decision() -> None:
    timed_out = make_event(ApprovalTimedOut(approval_id="a1", run_id="r1", status="escalated", decision="timeout",
                                            decided_at="2025-03-04T10:00:00Z", timeout_action="escalate"),
                           aggregate_id="a1", seq=2, actor=Actor.system("approvals"))
    state = state_of(requested(decision_type="select_option", options=["x"], timeout_action="escalate"), timed_out)
    assert resolution(state, "timeout") == {
        "wait_id": "a1", "approval_id": "a1", "status": "escalated", "decision": "timeout",
        "decided_by": "system:approvals", "decided_at": "2025-03-04T10:00:00.000000Z", "comment": None,
        "payload": None, "source": "timeout"}
    view = approval_view(state, "queued")
    assert (view["status"], view["options"], view["run_status"], view["timeout_action"]) == (
        "escalated", ["x"], "queued", "escalate")
    assert approval_view(state_of(requested(options=["ignored"])))["options"] == []
