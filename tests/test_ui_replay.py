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
    event(3, "step_completed", "fetch", "get", output_variable="product", variables={"product": {"name": "lmap"}}),
    event(4, "step_completed", "fetch", "fix", variables={"product": {"name": "lamp"}, "fixed": 1}),
    event(5, "node_completed", "fetch", variables={}),
    event(6, "node_started", "gate"),
    event(7, "node_paused", "gate"),
    event(8, "node_completed", "gate", variables={"decision": "approved", "fixed": 2}),
    event(9, "run_completed", outputs={"product": {"name": "lamp"}}),
]
NODES = ["fetch", "gate", "never"]


def statuses(at: int) -> dict[str, str]:
    return {node: state["status"] for node, state in replay.node_statuses(EVENTS[:at], NODES).items()}


def test_node_statuses_after_each_event() -> None:
    assert statuses(0) == {"fetch": "not_started", "gate": "not_started", "never": "not_started"}
    assert statuses(2) == {"fetch": "running", "gate": "not_started", "never": "not_started"}
    assert statuses(7) == {"fetch": "completed", "gate": "paused", "never": "not_started"}
    assert statuses(9) == {"fetch": "completed", "gate": "completed", "never": "skipped"}  # ended: never ran
    assert replay.node_statuses(EVENTS[:7], NODES)["fetch"]["last_seq"] == 5


def values(at: int, events: list[dict[str, Any]] = EVENTS) -> dict[str, tuple[Any, str, int | None]]:
    return {v.name: (v.value if v.known else "?", v.origin, v.seq) for v in replay.variables(events[:at])}


def test_each_variable_shows_its_value_after_any_event() -> None:
    assert values(0) == {}
    assert values(1) == {"product_id": (7, "input", 1)}
    assert values(3)["product"] == ({"name": "lmap"}, "written by fetch · get", 3)
    assert values(4) == {"product_id": (7, "input", 1), "product": ({"name": "lamp"}, "written by fetch · fix", 4),
                         "fixed": (1, "written by fetch · fix", 4)}
    assert values(7) == values(4)  # nothing written since
    assert values(8)["fixed"] == (2, "written by gate", 8)  # a node's own write (an approval's decision…)
    assert values(8)["decision"] == ("approved", "written by gate", 8)
    assert values(9)["product"] == ({"name": "lamp"}, "written by fetch · fix", 4)  # the outputs agree


def test_events_without_values_name_the_step_that_wrote_the_variable() -> None:
    older = [event(1, "run_created", input_vars={}), event(2, "step_completed", "fetch", "get",
                                                           output_variable="product"),
             event(3, "run_completed", outputs={"product": {"name": "lamp"}})]
    assert values(2, older) == {"product": ("?", "written by fetch · get", 2)}
    assert values(3, older) == {"product": ({"name": "lamp"}, "written by fetch · get", 2)}


def test_a_value_too_large_for_an_event_shows_its_size() -> None:
    stub = {"_truncated": True, "bytes": 70000, "sha256": "ab"}
    [big] = replay.variables([event(1, "step_completed", "n", "s", variables={"blob": stub})])
    assert big.too_large == 70000
    assert replay.variables(EVENTS[:1])[0].too_large is None


def test_a_retry_with_new_inputs_replaces_their_values() -> None:
    events = [*EVENTS[:1], event(2, "run_retry_requested", retry_count=1, input_vars={"product_id": 8})]
    assert [(v.value, v.origin) for v in replay.variables(events)] == [(8, "retry input")]


def test_a_loops_iterator_variable_shows_each_iterations_item() -> None:
    events = [event(1, "run_created", input_vars={}),
              *[event(2 + i, "loop_iteration", "each", iteration=i, total=2, item_preview=str(item),
                      variables={"sku": item, "position": i}) for i, item in enumerate(({"id": "A"}, {"id": "B"}))],
              event(4, "loop_iteration", "old", iteration=0, total=1, item_preview="9")]  # an older event: no values
    assert values(2, events) == {"sku": ({"id": "A"}, "loop each, iteration 1 of 2", 2),
                                 "position": (0, "loop each, iteration 1 of 2", 2)}
    assert values(3, events)["sku"] == ({"id": "B"}, "loop each, iteration 2 of 2", 3)
    assert values(4, events) == values(3, events)
