"""The run aggregate's pure rules (api.md §5.2): statuses, transitions, the effect of every event on ``status``
and ``waiting_on``, the resume rule, terminal idempotence and the cancel/retry/delete guards."""

from __future__ import annotations

from typing import Any

import pytest

from ckp_core import runs
from ckp_core.errors import CommandRefused
from ckp_core.events import Actor, EventEnvelope
from ckp_core.runs import RunState, RunStatus, effect, evolve, fold

pytestmark = pytest.mark.unit

RUNTIME = Actor.system("runtime")


def event(event_type: str, seq: int = 1, **data: Any) -> EventEnvelope:
    return EventEnvelope(type=event_type, aggregate="run", aggregate_id="r1", seq=seq, actor=RUNTIME, data=data)


def at(status: RunStatus, waiting_on: dict[str, Any] | None = None) -> RunState:
    return RunState("r1", seq=5, exists=True, status=status, waiting_on=waiting_on)


def after(before: RunStatus, event_type: str, data: dict[str, Any] | None = None) -> RunStatus:
    return evolve(at(before), event(event_type, seq=6, **(data or {}))).status


SUSPENDS = {"suspends_run": True}
RESUMES = {"resumes_run": True}

# (from, event, data, to): every row of the §5.2 transition table
SPEC_TABLE: list[tuple[RunStatus, str, dict[str, Any], RunStatus]] = [
    ("created", "execution_started", {}, "running"),
    ("queued", "execution_started", {}, "running"),
    ("created", "execution_resumed", {}, "running"),
    ("queued", "execution_resumed", {}, "running"),
    ("running", "approval_requested", SUSPENDS, "waiting_approval"),
    ("running", "workflow_delegated", SUSPENDS, "paused"),
    ("running", "subflow_started", SUSPENDS, "paused"),
    ("waiting_approval", "approval_decision_received", RESUMES, "queued"),
    ("paused", "workflow_callback_received", RESUMES, "queued"),
    ("paused", "callback_timed_out", RESUMES, "queued"),
    ("paused", "subflow_completed", RESUMES, "queued"),
    ("paused", "subflow_failed", RESUMES, "queued"),
    ("running", "run_completed", {}, "completed"),
    ("running", "run_failed", {}, "failed"),
    ("created", "run_canceled", {}, "canceled"),
    ("queued", "run_canceled", {}, "canceled"),
    ("waiting_approval", "run_canceled", {}, "canceled"),
    ("paused", "run_canceled", {}, "canceled"),
    ("running", "run_cancel_requested", {}, "canceling"),
    ("canceling", "run_canceled", {}, "canceled"),
    ("failed", "run_retry_requested", {}, "queued"),
    ("canceled", "run_retry_requested", {}, "queued"),
]


def test_statuses_and_their_groups() -> None:
    assert runs.STATUSES == ("created", "queued", "running", "waiting_approval", "paused", "canceling", "completed",
                             "failed", "canceled")
    assert runs.TERMINAL_STATUSES == ("completed", "failed", "canceled")
    assert set(runs.ACTIVE_STATUSES) | set(runs.TERMINAL_STATUSES) == set(runs.STATUSES)
    assert not set(runs.ACTIVE_STATUSES) & set(runs.TERMINAL_STATUSES)
    assert set(runs.IDLE_STATUSES) | set(runs.EXECUTING_STATUSES) == set(runs.ACTIVE_STATUSES)
    assert not set(runs.IDLE_STATUSES) & set(runs.EXECUTING_STATUSES)
    assert set(runs.WAITING_STATUSES) <= set(runs.IDLE_STATUSES)
    assert set(runs.RETRYABLE_STATUSES) <= set(runs.TERMINAL_STATUSES)
    assert set(runs.TRANSITIONS) == set(runs.STATUSES) == set(runs.ALLOWED_ACTIONS)
    assert all(set(to) <= set(runs.STATUSES) for to in runs.TRANSITIONS.values())
    assert runs.ENDS == {"run_completed": "completed", "run_failed": "failed", "run_canceled": "canceled",
                         "run_deleted": "deleted"}


@pytest.mark.parametrize(("before", "event_type", "data", "expected"), SPEC_TABLE)
def test_every_row_of_the_transition_table(before: RunStatus, event_type: str, data: dict[str, Any],
                                           expected: RunStatus) -> None:
    assert after(before, event_type, data) == expected
    assert expected in runs.TRANSITIONS[before]


def test_every_listed_transition_is_made_by_some_event() -> None:
    candidates: list[tuple[str, dict[str, Any]]] = [
        ("execution_started", {}), ("execution_resumed", {}), ("execution_recovered", {}),
        ("approval_requested", SUSPENDS), ("workflow_delegated", SUSPENDS), ("run_suspended", {"status": "paused"}),
        ("approval_decision_received", RESUMES), ("run_cancel_requested", {}), ("run_completed", {}),
        ("run_failed", {}), ("run_canceled", {}), ("run_retry_requested", {})]
    for before, targets in runs.TRANSITIONS.items():
        made = {after(before, t, d) for t, d in candidates}
        assert set(targets) <= made, before


# every event type that changes the status, from a running run (resumes from a waiting one)
@pytest.mark.parametrize(("before", "event_type", "data", "expected"), [
    ("created", "run_created", {}, "created"),
    ("created", "execution_started", {}, "running"),
    ("queued", "execution_resumed", {}, "running"),
    ("running", "execution_recovered", {}, "running"),
    ("queued", "execution_recovered", {}, "running"),
    ("running", "approval_requested", SUSPENDS, "waiting_approval"),
    ("running", "workflow_delegated", SUSPENDS, "paused"),
    ("running", "subflow_started", SUSPENDS, "paused"),
    ("running", "run_suspended", {"status": "waiting_approval"}, "waiting_approval"),
    ("running", "run_suspended", {"status": "paused"}, "paused"),
    ("running", "run_suspended", {}, "paused"),
    ("waiting_approval", "approval_decision_received", RESUMES, "queued"),
    ("paused", "workflow_callback_received", RESUMES, "queued"),
    ("paused", "callback_timed_out", RESUMES, "queued"),
    ("paused", "subflow_completed", RESUMES, "queued"),
    ("paused", "subflow_failed", RESUMES, "queued"),
    ("running", "run_cancel_requested", {}, "canceling"),
    ("running", "run_completed", {}, "completed"),
    ("running", "run_failed", {}, "failed"),
    ("canceling", "run_canceled", {}, "canceled"),
    ("failed", "run_retry_requested", {}, "queued"),
])
def test_events_that_change_the_status(before: RunStatus, event_type: str, data: dict[str, Any],
                                       expected: RunStatus) -> None:
    assert after(before, event_type, data) == expected


@pytest.mark.parametrize("event_type", ["node_started", "node_completed", "step_started", "step_completed",
                                        "llm_usage", "log", "artifact_created", "pool_saturated",
                                        "command_rejected"])
def test_other_events_leave_status_and_waiting_on(event_type: str) -> None:
    waiting = {"kind": "approval", "approval_id": "a1"}
    state = evolve(at("waiting_approval", waiting), event(event_type, seq=6))
    assert (state.status, state.waiting_on, state.seq) == ("waiting_approval", waiting, 6)


@pytest.mark.parametrize("event_type", runs.PAUSING_EVENTS)
def test_a_pausing_event_that_does_not_suspend_the_run_changes_nothing(event_type: str) -> None:
    assert after("running", event_type, {"suspends_run": False}) == "running"
    assert after("running", event_type) == "running"


@pytest.mark.parametrize("event_type", runs.RESUMING_EVENTS)
@pytest.mark.parametrize("before", runs.STATUSES)
def test_the_resume_rule_moves_only_a_waiting_run_to_queued(event_type: str, before: RunStatus) -> None:
    """A resume moves ``waiting_approval``/``paused`` to ``queued``; any other status is kept (the runtime may
    append ``execution_resumed`` before the resume event: the run stays ``running``)."""
    expected = "queued" if before in runs.WAITING_STATUSES else before
    assert after(before, event_type, RESUMES) == expected
    assert after(before, event_type, {"resumes_run": False}) == before
    assert effect(event_type, RESUMES).status_after(before) == expected


def test_a_resume_the_runtime_announced_before_execution_resumed_reads_queued() -> None:
    """The writer's view and the projection agree in the window between the resume event and
    ``execution_resumed`` (the runtime's own fold used to keep ``waiting_approval`` there)."""
    events = [event("run_created", 1), event("execution_started", 2),
              event("approval_requested", 3, approval_id="a1", suspends_run=True),
              event("approval_decision_received", 4, resumes_run=True)]
    assert fold(events).status == "queued"
    assert fold([*events, event("execution_resumed", 5)]).status == "running"


def test_a_child_run_resume_after_execution_resumed_keeps_running() -> None:
    events = [event("run_created", 1), event("execution_started", 2),
              event("subflow_started", 3, child_run_id="c1", suspends_run=True), event("execution_resumed", 4),
              event("subflow_completed", 5, child_run_id="c1", resumes_run=True)]
    state = fold(events)
    assert (state.status, state.waiting_on) == ("running", None)


def test_waiting_on_follows_pauses_suspensions_and_resumes() -> None:
    pause = effect("workflow_delegated", {"suspends_run": True, "node_id": "n", "step_id": "s",
                                          "expires_at": "2025-01-01T00:00:00Z"})
    assert pause.waiting == "set"
    assert pause.waiting_on == {"kind": "callback", "node_id": "n", "step_id": "s",
                                "expires_at": "2025-01-01T00:00:00Z"}
    assert effect("approval_requested", {"suspends_run": True, "approval_id": "a1"}).waiting_on == {
        "kind": "approval", "approval_id": "a1"}
    assert effect("subflow_started", {"suspends_run": True, "child_run_id": "c1"}).waiting_on == {
        "kind": "child_run", "run_id": "c1"}
    waits = [{"kind": "child_run", "id": "c1"}, {"kind": "approval", "id": "a2"}]
    assert effect("run_suspended", {"status": "waiting_approval", "waiting_on": waits}).waiting_on == {
        "kind": "approval", "approval_id": "a2"}
    assert runs.suspended_on([{"kind": "child_run", "id": "c1"}]) == {"kind": "child_run", "run_id": "c1"}
    assert runs.suspended_on([]) is None
    none_left = effect("run_suspended", {"status": "paused", "waiting_on": []})
    assert (none_left.waiting, none_left.waiting_on) == ("set", None)  # the projector stores JSON null
    for t in (*runs.CLEARS_WAITING, "approval_decision_received"):
        assert effect(t, RESUMES).waiting == "clear", t
    assert effect("execution_recovered", {}).waiting == "keep"
    assert effect("run_cancel_requested", {}).waiting == "keep"


def test_fold_of_a_suspended_run_and_its_resume() -> None:
    events = [event("run_created", 1), event("execution_started", 2),
              event("approval_requested", 3, approval_id="a1", suspends_run=True)]
    state = fold(events)
    assert (state.exists, state.status, state.waiting_on, state.seq, state.run_id) == (
        True, "waiting_approval", {"kind": "approval", "approval_id": "a1"}, 3, "r1")
    resumed = evolve(state, event("approval_decision_received", 4, resumes_run=True))
    assert (resumed.status, resumed.waiting_on) == ("queued", None)
    assert state.status == "waiting_approval"  # evolve returns a new state


def test_fold_of_nothing() -> None:
    state = fold([], "r9")
    assert (state.run_id, state.exists, state.status, state.seq, state.deleted) == ("r9", False, "created", 0, False)


@pytest.mark.parametrize("end", list(runs.END_EVENTS))
def test_terminal_events_are_idempotent(end: str) -> None:
    events = [event("run_created", 1), event("execution_started", 2), event(end, 3)]
    once = fold(events)
    twice = evolve(once, event(end, 4))
    assert once.terminal
    assert twice.terminal
    assert (twice.status, twice.waiting_on) == (once.status, once.waiting_on) == (runs.END_EVENTS[end], None)
    assert effect(end, {}).status_after(once.status) == once.status


def test_a_late_resume_leaves_a_terminal_run_terminal() -> None:
    for status in runs.TERMINAL_STATUSES:
        assert after(status, "subflow_completed", RESUMES) == status


def test_run_deleted_keeps_the_terminal_status_and_marks_the_run_deleted() -> None:
    state = fold([event("run_created", 1), event("execution_started", 2), event("run_failed", 3),
                  event("run_deleted", 4)])
    assert (state.status, state.deleted) == ("failed", True)


def test_suspended_status() -> None:
    assert runs.suspended_status([{"kind": "callback"}, {"kind": "approval"}]) == "waiting_approval"
    assert runs.suspended_status([{"kind": "child_run"}]) == "paused"


# the action table of §5.2: cancel outcome per status (None: 409)
CANCEL: dict[str, str | None] = {
    "created": "cancel", "queued": "cancel", "waiting_approval": "cancel", "paused": "cancel",
    "running": "request", "canceling": "noop", "completed": None, "failed": None, "canceled": "noop"}


@pytest.mark.parametrize("status", runs.STATUSES)
def test_guards_follow_the_action_table(status: RunStatus) -> None:
    if CANCEL[status] is None:
        with pytest.raises(CommandRefused) as refused:
            runs.decide_cancel(status)
        assert (refused.value.code, refused.value.message) == ("invalid_run_transition",
                                                              f"a {status} run cannot be canceled")
        assert refused.value.extra == {"current_status": status, "allowed": runs.allowed_actions(status)}
    else:
        assert runs.decide_cancel(status) == CANCEL[status]
        assert "cancel" in runs.allowed_actions(status)
    if status in ("failed", "canceled"):
        runs.decide_retry(status)
        assert "retry" in runs.allowed_actions(status)
    else:
        with pytest.raises(CommandRefused, match=f"a {status} run cannot be retried"):
            runs.decide_retry(status)
        assert "retry" not in runs.allowed_actions(status)
    if status in ("completed", "failed", "canceled"):
        runs.decide_delete(status)
        assert "delete" in runs.allowed_actions(status)
    else:
        with pytest.raises(CommandRefused, match=f"a {status} run cannot be deleted") as refused:
            runs.decide_delete(status)
        assert refused.value.extra == {"current_status": status, "allowed": ["cancel", "rerun"]}
        assert "delete" not in runs.allowed_actions(status)
    assert "rerun" in runs.allowed_actions(status)


def test_allowed_actions_of_an_unknown_status() -> None:
    assert runs.allowed_actions("deleted") == []
