"""The run replay's rebuild from API event items (ui/replay.py): node statuses and variables after any event."""

from __future__ import annotations

from typing import Any

import pytest

from langorch_gateway.ui import replay

pytestmark = pytest.mark.unit


def event(seq: int, kind: str, node: str | None = None, step: str | None = None, **payload: Any) -> dict[str, Any]:
    return {"seq": seq, "event_type": kind, "node_id": node, "step_id": step, "payload": payload,
            "created_at": f"2026-12-06T10:00:{seq:02d}Z"}


EVENTS = [
    event(1, "run_created", input_vars={"product_id": 7}),
    event(2, "node_started", "fetch"),
    event(3, "step_completed", "fetch", "get", output_variable="product"),
    event(4, "node_completed", "fetch"),
    event(5, "node_started", "gate"),
    event(6, "node_paused", "gate"),
    event(7, "node_completed", "gate"),
    event(8, "run_completed", outputs={"product": {"name": "lamp"}}),
]
NODES = ["fetch", "gate", "never"]


def statuses(at: int) -> dict[str, str]:
    return {node: state["status"] for node, state in replay.node_statuses(EVENTS[:at], NODES).items()}


def test_node_statuses_after_each_event() -> None:
    assert statuses(0) == {"fetch": "not_started", "gate": "not_started", "never": "not_started"}
    assert statuses(2) == {"fetch": "running", "gate": "not_started", "never": "not_started"}
    assert statuses(6) == {"fetch": "completed", "gate": "paused", "never": "not_started"}
    assert statuses(8) == {"fetch": "completed", "gate": "completed", "never": "skipped"}  # ended: never ran
    assert replay.node_statuses(EVENTS[:6], NODES)["fetch"]["last_seq"] == 4


def test_variables_carry_the_values_the_events_hold_and_who_wrote_the_rest() -> None:
    assert replay.variables(EVENTS[:0]) == []
    first = replay.variables(EVENTS[:1])
    assert [(v.name, v.value, v.known, v.origin, v.seq) for v in first] == [("product_id", 7, True, "input", 1)]
    written = {v.name: v for v in replay.variables(EVENTS[:3])}["product"]
    assert (written.known, written.origin, written.seq) == (False, "written by fetch · get", 3)
    final = {v.name: v for v in replay.variables(EVENTS)}["product"]
    assert (final.known, final.value, final.origin, final.seq) == (True, {"name": "lamp"}, "written by fetch · get", 3)


def test_a_retry_with_new_inputs_replaces_their_values() -> None:
    events = [*EVENTS[:1], event(2, "run_retry_requested", retry_count=1, input_vars={"product_id": 8})]
    assert [(v.value, v.origin) for v in replay.variables(events)] == [(8, "retry input")]
