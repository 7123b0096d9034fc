"""Edges and the static rules of the node types (ckp.md §3.4-§3.15), as the compiler reports them."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_harness import END, NODE, diagnostics

pytestmark = pytest.mark.unit


# --- §3.4 edges and the static rules of §3.5–§3.15 -----------------------------------------------------------


@pytest.mark.parametrize(("nodes", "expected"), [
    ({"a": {"type": "logic", "default_next_node": "z", "next_node": "z"}, "z": END},
     ("error", "edge_not_allowed", f"{NODE}/a/next_node")),
    ({"a": {"type": "terminate", "next_node": "a"}}, ("error", "edge_not_allowed", f"{NODE}/a/next_node")),
    ({"a": {"type": "human_approval", "on_approve": "z", "on_reject": "z", "next_node": "z"}, "z": END},
     ("error", "edge_not_allowed", f"{NODE}/a/next_node")),
    ({"a": {"type": "sequence", "next_node": "nowhere"}}, ("error", "unknown_target", f"{NODE}/a/next_node")),
    ({"a": {"type": "logic"}}, ("error", "empty_logic", f"{NODE}/a")),
    ({"a": {"type": "logic", "rules": [{"condition": "true", "next_node": "z"}]}, "z": END},
     ("warning", "logic_without_default", f"{NODE}/a")),
    ({"a": END, "b": END}, ("warning", "unreachable_node", f"{NODE}/b")),
    ({"a": {"type": "terminate", "status": "aborted"}}, ("error", "invalid_value", f"{NODE}/a/status")),
    ({"a": {"type": "parallel", "branch_failure": "retry", "branches": [{"branch_id": "x", "start_node": "z"}]},
      "z": END}, ("error", "invalid_value", f"{NODE}/a/branch_failure")),
    ({"a": {"type": "processing", "operations": [{"action": "teleport"}]}},
     ("error", "unknown_operation", f"{NODE}/a/operations/0/action")),
    ({"a": {"type": "transform", "transformations": [{"type": "explode", "source_variable": "x",
                                                      "output_variable": "y"}]}},
     ("error", "unknown_transform_type", f"{NODE}/a/transformations/0/type")),
    ({"a": {"type": "transform", "transformations": [{"type": "aggregate", "source_variable": "x",
                                                      "expression": "median(v)", "output_variable": "y"}]}},
     ("error", "expression_syntax_error", f"{NODE}/a/transformations/0/expression")),
])
def test_static_rules(nodes: dict[str, Any], expected: tuple[str, str, str]) -> None:
    found = diagnostics(nodes)
    assert expected in found, found


@pytest.mark.parametrize("nodes", [
    # edges through which a node counts as reachable: escalation handler, fallback, on_failure, loop body, branch
    {"a": {"type": "sequence", "next_node": "z", "sla": {"max_duration_ms": 10, "on_breach": "escalate",
                                                         "escalation_handler": "b"}}, "b": END, "z": END},
    {"a": {"type": "sequence", "next_node": "z", "error_handlers": [{"action": "ignore", "fallback_node": "b"}]},
     "b": END, "z": END},
    {"a": {"type": "loop", "iterator": "[]", "iterator_variable": "x", "body_node": "b", "next_node": "z"},
     "b": {"type": "sequence"}, "z": END},
    {"a": {"type": "human_approval", "decision_type": "select_option", "options": ["p", "q"],
           "option_routes": {"p": "b", "q": "z"}}, "b": END, "z": END},
])
def test_every_edge_kind_counts_for_reachability(nodes: dict[str, Any]) -> None:
    assert not [d for d in diagnostics(nodes) if d[1] == "unreachable_node"], diagnostics(nodes)


def test_on_failure_counts_as_an_edge() -> None:
    found = diagnostics({"a": END, "rescue": END}, global_config={"on_failure": "rescue"})
    assert not [d for d in found if d[1] == "unreachable_node"], found


def test_unknown_node_type_is_one_diagnostic_and_skips_reachability() -> None:
    found = diagnostics({"a": {"type": "teleporter", "next_node": "nowhere", "bogus": 1}, "b": END})
    assert found == [("error", "unknown_node_type", f"{NODE}/a/type")], found


def test_fields_of_other_types_draw_unknown_field_warnings() -> None:
    found = diagnostics({"a": {"type": "sequence", "next_node": "z", "outputs": {"x": 1}, "iterator": "xs"},
                         "z": END})
    assert ("warning", "unknown_field", f"{NODE}/a/outputs") in found, found
    assert ("warning", "unknown_field", f"{NODE}/a/iterator") in found, found
