"""Run replay: the run as it was after any of its events, rebuilt on the server from the events the API lists
(``GET /api/runs/{id}/events``), so a slider position is a link one can share (``?at=<n>``).

* Node statuses: the first ``n`` events folded with the rules of the API's run graph
  (:func:`langorch_gateway.routes_run_graph.fold_node_status`); the run counts as ended once a terminal event is
  among them.
* Variables: folded from what the events carry. ``run_created`` (and a retry's new inputs) carries the input
  values; ``step_completed`` the variables its step wrote and ``node_completed`` those its node changed otherwise
  (transforms, approvals, loops, merges…), each with its value after the write, masked like every payload (a
  sensitive value shows as the mask, a value too large for an event as its size); ``loop_iteration`` a loop's
  iterator and index variables for the iteration it starts; ``run_completed`` the outputs.
  Events written before they carried values name only the variable a step wrote: it shows who wrote it.
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

    @property
    def too_large(self) -> int | None:
        """The value's size in bytes when it was too large for an event (a ``_truncated`` stub), else None."""
        value = self.value
        if self.known and isinstance(value, dict) and value.get("_truncated") is True:
            return int(value.get("bytes") or 0)
        return None


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
        elif kind in ("step_completed", "node_completed"):
            where = f"{e['node_id']} · {e['step_id']}" if kind == "step_completed" else str(e["node_id"])
            known(payload.get("variables"), f"written by {where}", e["seq"])
            name = payload.get("output_variable")
            if name and name not in (payload.get("variables") or {}):  # an event from before values were carried
                found[name] = Variable(name, origin=f"written by {where}", seq=e["seq"])
        elif kind == "loop_iteration":  # the iterator (and index) variable as the iteration starts
            where = f"loop {e['node_id']}, iteration {int(payload.get('iteration') or 0) + 1} of {payload.get('total')}"
            known(payload.get("variables"), where, e["seq"])
        elif kind == "run_completed":
            for name, value in (payload.get("outputs") or {}).items():
                previous = found.get(name)
                found[name] = Variable(name, value, True, previous.origin if previous else "output",
                                       previous.seq if previous else e["seq"])
    return list(found.values())
