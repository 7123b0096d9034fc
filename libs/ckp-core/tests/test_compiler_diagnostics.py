"""Compiler rules of this slice: each failing document reports its code and JSON path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ckp_core.compiler import compile_document

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "procedure_id": "p", "version": "1",
    "workflow_graph": {"start_node": "a", "nodes": {
        "a": {"type": "sequence", "next_node": "b",
              "steps": [{"step_id": "s1", "action": "log", "message": "hi {{name}}"}]},
        "b": {"type": "logic", "rules": [{"condition": "x > 1", "next_node": "c"}], "default_next_node": "c"},
        "c": {"type": "terminate"},
    }},
    "variables_schema": {"name": {"type": "string"}, "x": {"type": "number"}},
}


def mutate(path: list[str | int], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


def codes(doc: Any) -> list[tuple[str, str]]:
    return [(d.code, d.path) for d in compile_document(doc).diagnostics if d.severity != "info"]


def test_base_document_is_clean() -> None:
    assert codes(BASE) == []


@pytest.mark.parametrize(("path", "value", "expected"), [
    (["workflow_graph", "start_node"], "zz", ("unknown_start_node", "/workflow_graph/start_node")),
    (["workflow_graph", "nodes", "a", "next_node"], "zz", ("unknown_target", "/workflow_graph/nodes/a/next_node")),
    (["workflow_graph", "nodes", "a", "steps", 0, "action"], "fetch",
     ("unknown_action", "/workflow_graph/nodes/a/steps/0/action")),
    (["workflow_graph", "nodes", "b", "rules", 0, "condition"], "x >",
     ("expression_syntax_error", "/workflow_graph/nodes/b/rules/0/condition")),
    (["workflow_graph", "nodes", "a", "steps", 0, "message"], "hi {{name +}}",
     ("template_syntax_error", "/workflow_graph/nodes/a/steps/0/message")),
    (["workflow_graph", "nodes", "c", "next_node"], "a", ("edge_not_allowed", "/workflow_graph/nodes/c/next_node")),
    (["variables_schema", "run_id"], {"type": "string"}, ("reserved_variable_name", "/variables_schema/run_id")),
    (["variables_schema", "x", "default"], "abc", ("invalid_default", "/variables_schema/x/default")),
    (["procedure_id"], KeyError, ("missing_field", "/procedure_id")),
    (["workflow_graph", "nodes", "a", "type"], "teleport", ("unknown_node_type", "/workflow_graph/nodes/a/type")),
])
def test_each_rule_reports_code_and_path(path: list[str | int], value: Any, expected: tuple[str, str]) -> None:
    assert expected in codes(mutate(path, value))


def test_duplicate_step_ids_and_unreachable_nodes() -> None:
    doc = mutate(["workflow_graph", "nodes", "a", "steps"], [
        {"step_id": "s", "action": "log", "message": "1"}, {"step_id": "s", "action": "log", "message": "2"}])
    doc["workflow_graph"]["nodes"]["orphan"] = {"type": "terminate"}
    found = codes(doc)
    assert ("duplicate_id", "/workflow_graph/nodes/a/steps/1/step_id") in found
    assert ("unreachable_node", "/workflow_graph/nodes/orphan") in found


def test_unknown_node_type_is_one_diagnostic_and_skips_reachability() -> None:
    doc = mutate(["workflow_graph", "nodes", "a", "type"], "teleport")
    doc["workflow_graph"]["nodes"]["orphan"] = {"type": "terminate"}
    assert [c for c, _ in codes(doc)] == ["unknown_node_type"]


def test_non_object_document() -> None:
    assert codes([1, 2]) == [("invalid_document", "")]
