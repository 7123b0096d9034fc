"""The run aggregate (api.md §5.2): its statuses and the groups callers test against, its transitions, the
``status`` and ``waiting_on`` its events leave, and the pure guards of cancel, retry and delete.

No I/O here. The runtime (the run's single writer) folds a run's events with :func:`fold` and asks a
``decide_*`` guard before it appends; the gateway asks the same guards of the projected status before it
publishes a command. The projector applies each event's :func:`effect` to the ``runs`` row — the very effect
:func:`evolve` applies in Python — so the projected status never disagrees with the writer's.

Events are facts: :func:`evolve` applies them from whatever status the run has (the writer validated them
when it appended them); :data:`TRANSITIONS` documents which status changes the writer produces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from ckp_core.errors import CommandRefused
from ckp_core.events import EventEnvelope

RunStatus = Literal["created", "queued", "running", "waiting_approval", "paused", "canceling", "completed",
                    "failed", "canceled"]
"""A run's status (api.md §5.2)."""

STATUSES: tuple[RunStatus, ...] = get_args(RunStatus)
INITIAL_STATUS: RunStatus = "created"
TERMINAL_STATUSES: tuple[RunStatus, ...] = ("completed", "failed", "canceled")
"""Ended: nothing executes or waits; a run can be deleted (and, failed or canceled, retried) only here."""
ACTIVE_STATUSES: tuple[RunStatus, ...] = tuple(s for s in STATUSES if s not in TERMINAL_STATUSES)
"""Not ended (a project's ``active_run_count``, a version that is still in use)."""
WAITING_STATUSES: tuple[RunStatus, ...] = ("waiting_approval", "paused")
"""Durably suspended: a resume (decision, callback, child run's end) is taken and moves the run to ``queued``."""
EXECUTING_STATUSES: tuple[RunStatus, ...] = ("running", "canceling")
"""A runtime replica executes the run now."""
IDLE_STATUSES: tuple[RunStatus, ...] = ("created", "queued", "waiting_approval", "paused")
"""Not ended and nothing executes it: a cancel is immediate (``canceled``, no ``canceling``)."""
RETRYABLE_STATUSES: tuple[RunStatus, ...] = ("failed", "canceled")
"""A retry (api.md §5.5) continues the same run from here."""

ACTIONS = ("cancel", "retry", "rerun", "delete")
ALLOWED_ACTIONS: Mapping[str, tuple[str, ...]] = {
    "created": ("cancel", "rerun"), "queued": ("cancel", "rerun"), "running": ("cancel", "rerun"),
    "waiting_approval": ("cancel", "rerun"), "paused": ("cancel", "rerun"), "canceling": ("cancel", "rerun"),
    "completed": ("rerun", "delete"), "failed": ("retry", "rerun", "delete"),
    "canceled": ("cancel", "retry", "rerun", "delete"),
}
"""The actions of the §5.2 action table valid in each status (the ``allowed`` member of a 409); a cancel of a
``canceling`` or ``canceled`` run is a no-op, not a refusal."""

TRANSITIONS: Mapping[RunStatus, tuple[RunStatus, ...]] = {
    "created": ("running", "failed", "canceled"),
    "queued": ("running", "failed", "canceled"),
    "running": ("waiting_approval", "paused", "canceling", "completed", "failed"),
    "waiting_approval": ("queued", "running", "failed", "canceled"),
    "paused": ("queued", "running", "failed", "canceled"),
    "canceling": ("canceled", "completed", "failed"),
    "completed": (),
    "failed": ("queued",),
    "canceled": ("queued",),
}
"""The status changes the writer produces: the table of api.md §5.2, plus what the runtime also appends —
a run fails from any live status (its version became unrunnable before it started, §7.2; a defect kept
failing its command, §7.16), a suspended run continues straight to ``running`` when the wait that ends
needs no queued step first (a child run's end), and a run whose graph ends before it sees the cancel
request completes or fails from ``canceling``. ``run_deleted`` removes a terminal run: no status follows."""

RUNNING_EVENTS = ("execution_started", "execution_resumed", "execution_recovered")
PAUSING_EVENTS = ("approval_requested", "workflow_delegated", "subflow_started")
"""They suspend the run when their ``suspends_run`` is true."""
RESUMING_EVENTS = ("approval_decision_received", "workflow_callback_received", "callback_timed_out",
                   "subflow_completed", "subflow_failed")
"""They resume the run when their ``resumes_run`` is true."""
END_EVENTS: Mapping[str, RunStatus] = {"run_completed": "completed", "run_failed": "failed",
                                       "run_canceled": "canceled"}
"""The events that end a run, and the terminal status each leaves."""
DELETED = "deleted"
"""What a deleted run's end is called (the ``end`` of its event stream, a late callback, a canceled approval)."""
ENDS: Mapping[str, str] = {**END_EVENTS, "run_deleted": DELETED}
"""The events after which a run's stream has nothing more to say (until a retry), and how each names the end."""
CLEARS_WAITING = ("execution_started", "execution_resumed", "run_completed", "run_failed", "run_canceled",
                  "run_retry_requested")
"""Events that leave ``waiting_on`` null besides the resuming ones (``execution_recovered`` keeps it)."""

WaitingOn = dict[str, Any]
"""``RunOut.waiting_on`` (api.md §5.1): ``{kind: approval|callback|child_run, …}``."""


@dataclass(frozen=True)
class Effect:
    """What one event does to the run's ``status`` and ``waiting_on``.

    ``status`` is the status after the event (None: unchanged); with ``only_from`` set the status changes only
    from one of those statuses (a resume moves a waiting run to ``queued``; a run the runtime already moved
    back to ``running`` keeps it). ``waiting`` says whether ``waiting_on`` is kept, set to ``waiting_on`` (which
    may be None: a suspension with no wait left) or cleared. The projector turns an effect into its SQL
    ``SET`` clauses; :func:`evolve` applies it in Python.
    """

    status: RunStatus | None = None
    only_from: tuple[RunStatus, ...] | None = None
    waiting: Literal["keep", "set", "clear"] = "keep"
    waiting_on: WaitingOn | None = None

    def status_after(self, current: RunStatus) -> RunStatus:
        """The status a run in ``current`` has after the event."""
        if self.status is None or (self.only_from is not None and current not in self.only_from):
            return current
        return self.status


@dataclass(frozen=True)
class RunState:
    """One run as its events leave it; ``exists`` is False until ``run_created``, ``deleted`` True after
    ``run_deleted`` (the status then stays the terminal one it had)."""

    run_id: str = ""
    seq: int = 0
    exists: bool = False
    deleted: bool = False
    status: RunStatus = INITIAL_STATUS
    waiting_on: WaitingOn | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def effect(event_type: str, data: Mapping[str, Any]) -> Effect:
    """The effect of one run event on ``status`` and ``waiting_on`` (api.md §5.2)."""
    if event_type == "run_created":
        return Effect(INITIAL_STATUS)
    if event_type in RUNNING_EVENTS:
        return Effect("running", waiting="clear" if event_type in CLEARS_WAITING else "keep")
    if event_type in PAUSING_EVENTS and data.get("suspends_run"):
        return Effect("waiting_approval" if event_type == "approval_requested" else "paused", waiting="set",
                      waiting_on=waiting_on(event_type, data))
    if event_type == "run_suspended":
        suspended = data.get("status")
        return Effect(suspended if suspended in WAITING_STATUSES else "paused", waiting="set",
                      waiting_on=suspended_on(data.get("waiting_on")))
    if event_type in RESUMING_EVENTS and data.get("resumes_run"):
        # waiting → queued; the runtime may append execution_resumed first (a child run's end), and a run
        # already running again keeps its status
        return Effect("queued", only_from=WAITING_STATUSES, waiting="clear")
    if event_type == "run_cancel_requested":
        return Effect("canceling")
    if event_type in END_EVENTS:
        return Effect(END_EVENTS[event_type], waiting="clear")
    if event_type == "run_retry_requested":
        return Effect("queued", waiting="clear")
    return Effect()


def evolve(state: RunState, ev: EventEnvelope) -> RunState:
    """The run after one more of its events."""
    change = effect(ev.type, ev.data)
    waiting = state.waiting_on if change.waiting == "keep" else change.waiting_on
    return replace(state, run_id=ev.aggregate_id, seq=ev.seq, exists=state.exists or ev.type == "run_created",
                   deleted=state.deleted or ev.type == "run_deleted", status=change.status_after(state.status),
                   waiting_on=waiting)


def fold(events: Iterable[EventEnvelope], run_id: str = "") -> RunState:
    """The run after its events in stream order (``created`` and not existing for none)."""
    state = RunState(run_id)
    for ev in events:
        state = evolve(state, ev)
    return state


def waiting_on(event_type: str, data: Mapping[str, Any]) -> WaitingOn:
    """``waiting_on`` of a pausing event."""
    if event_type == "approval_requested":
        return {"kind": "approval", "approval_id": data.get("approval_id")}
    if event_type == "subflow_started":
        return {"kind": "child_run", "run_id": data.get("child_run_id")}
    return {"kind": "callback", "node_id": data.get("node_id"), "step_id": data.get("step_id"),
            "expires_at": data.get("expires_at")}


def suspended_on(waits: Any) -> WaitingOn | None:
    """``waiting_on`` of ``run_suspended``: the first approval it waits on, else its first wait."""
    items = [w for w in waits if isinstance(w, dict)] if isinstance(waits, list) else []
    if not items:
        return None
    w = next((w for w in items if w.get("kind") == "approval"), items[0])
    if w.get("kind") == "approval":
        return {"kind": "approval", "approval_id": w.get("id")}
    if w.get("kind") == "child_run":
        return {"kind": "child_run", "run_id": w.get("id")}
    return {"kind": "callback", "node_id": w.get("node_id"), "step_id": w.get("step_id"),
            "expires_at": w.get("expires_at")}


def suspended_status(waits: Iterable[Mapping[str, Any]]) -> RunStatus:
    """The status of a run suspended on ``waits``: ``waiting_approval`` while one is an approval, else ``paused``."""
    return "waiting_approval" if any(w.get("kind") == "approval" for w in waits) else "paused"


def allowed_actions(status: str) -> list[str]:
    """The actions valid in ``status`` (none for an unknown one)."""
    return list(ALLOWED_ACTIONS.get(status, ()))


def refusal(status: str, action: str) -> CommandRefused:
    """``invalid_run_transition`` (409): a ``status`` run cannot be ``action`` (past participle)."""
    return CommandRefused("invalid_run_transition", f"a {status} run cannot be {action}", current_status=status,
                          allowed=allowed_actions(status))


CancelDecision = Literal["noop", "cancel", "request"]


def decide_cancel(status: str) -> CancelDecision:
    """A cancel (api.md §5.4): ``cancel`` at once (``run_canceled``) when nothing executes the run, ``request``
    it (``run_cancel_requested``, ``canceling``) while it runs, ``noop`` when it is canceling or canceled;
    a completed or failed run refuses it."""
    if status in ("canceled", "canceling"):
        return "noop"
    if status in TERMINAL_STATUSES:
        raise refusal(status, "canceled")
    return "request" if status == "running" else "cancel"


def decide_retry(status: str) -> None:
    """A retry (api.md §5.5) needs a failed or canceled run."""
    if status not in RETRYABLE_STATUSES:
        raise refusal(status, "retried")


def decide_delete(status: str) -> None:
    """A delete (api.md §5.6) needs a terminal run."""
    if status not in TERMINAL_STATUSES:
        raise refusal(status, "deleted")
