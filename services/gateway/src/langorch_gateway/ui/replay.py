"""Run replay: the run as it was after any of its events, rebuilt on the server from the events the API lists
(``GET /api/runs/{id}/events``), so a slider position is a link one can share (``?at=<n>``).

* Node statuses: the first ``n`` events folded with the rules of the API's run graph
  (:func:`langorch_gateway.routes_run_graph.fold_node_status`); the run counts as ended once a terminal event is
  among them.
* Variables: what the events say about them. ``run_created`` (and a retry's new inputs) carries the input values; a
  ``step_completed`` names the variable its step wrote (the value itself stays in the runtime's checkpoints, not in
  events); ``run_completed`` carries the final outputs. So each variable shows its last known value, or that a step
  wrote it (which step, at which event) when the value is not in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from langorch_gateway.routes_run_graph import NODE_EVENTS, fold_node_status

ENDINGS = {"run_completed": "completed", "run_failed": "failed", "run_canceled": "canceled"}


@dataclass
class Variable:
    """One variable after the replayed events: its value when the events carry it, and who last set it."""

    name: str
    value: Any = None
    known: bool = False
    origin: str = ""
    seq: int | None = None


def node_statuses(events: list[dict[str, Any]], node_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each node's status after ``events`` (API event items, in order)."""
    ended = next((ENDINGS[e["event_type"]] for e in reversed(events) if e["event_type"] in ENDINGS), "running")
    node_events = [{"node_id": e["node_id"], "event_type": e["event_type"],
                    "created_at": datetime.fromisoformat(e["created_at"])}
                   for e in events if e["event_type"] in NODE_EVENTS and e.get("node_id")]
    last_seq = {e["node_id"]: e["seq"] for e in events if e.get("node_id")}
    return fold_node_status(node_events, node_ids, last_seq, ended)


def variables(events: list[dict[str, Any]]) -> list[Variable]:
    """The variables after ``events``, in the order they first appear."""
    found: dict[str, Variable] = {}

    def known(values: dict[str, Any] | None, origin: str, seq: int) -> None:
        for name, value in (values or {}).items():
            found[name] = Variable(name, value, True, origin, seq)

    for e in events:
        payload = e.get("payload") or {}
        kind = e["event_type"]
        if kind == "run_created":
            known(payload.get("input_vars"), "input", e["seq"])
        elif kind == "run_retry_requested":
            known(payload.get("input_vars"), "retry input", e["seq"])
        elif kind == "step_completed" and payload.get("output_variable"):
            name = payload["output_variable"]
            found[name] = Variable(name, origin=f"written by {e['node_id']} · {e['step_id']}", seq=e["seq"])
        elif kind == "run_completed":
            for name, value in (payload.get("outputs") or {}).items():
                previous = found.get(name)
                found[name] = Variable(name, value, True, previous.origin if previous else "output",
                                       previous.seq if previous else e["seq"])
    return list(found.values())
