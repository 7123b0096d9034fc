"""The console's pure parts: the start form from a ``variables_schema`` (the API's flat form) — which fields, in
which order, with which hints and choices, and what a submitted form becomes as ``input_vars`` — and the
side-by-side lines of the version diff, and the graph's SVG geometry."""

from __future__ import annotations

import pytest

from langorch_gateway.ui import forms, graph, textdiff

pytestmark = pytest.mark.unit

SCHEMA = {
    "note": {"type": "string", "required": False, "validation": {"regex": "^[a-z]+$"}},
    "tags": {"type": "array", "required": False, "validation": {"max": 3}},
    "product_id": {"type": "number", "required": True, "description": "Product", "validation": {"min": 1, "max": 100}},
    "mode": {"type": "string", "default": "standard", "validation": {"allowed_values": ["standard", "premium"]}},
    "dry": {"type": "boolean"},
    "final_payload": {"type": "object", "origin": "system_captured"},
}


def test_fields_required_first_with_hints_and_choices() -> None:
    order = [f.name for f in forms.fields_of(SCHEMA)]
    assert order == ["product_id", "note", "tags", "mode", "dry", "final_payload"]  # set by the workflow: last
    fields = {f.name: f for f in forms.fields_of(SCHEMA)}
    assert fields["product_id"].hint == "number, 1 to 100"
    assert fields["tags"].hint == "array, length at most 3, as JSON"
    assert fields["note"].hint == "string, matching ^[a-z]+$"
    assert fields["mode"].choices == ["standard", "premium"]
    assert fields["dry"].choices == ["true", "false"]
    assert fields["final_payload"].captured
    assert fields["product_id"].form_name == "var.product_id"
    assert fields["product_id"].error_key == "input_vars.product_id"
    assert forms.fields_of(None) == []


def test_submitted_form_becomes_input_vars() -> None:
    fields = forms.fields_of(SCHEMA)
    values, errors = forms.input_vars(fields, {"var.product_id": "7", "var.mode": "", "var.tags": '["a", "b"]',
                                               "var.final_payload": "{oops", "var.unknown": "x"})
    assert values == {"product_id": "7", "tags": ["a", "b"]}  # text as typed (the API coerces); empty: left out
    assert list(errors) == ["input_vars.final_payload"]
    assert errors["input_vars.final_payload"][0].startswith("Must be valid JSON")


def test_side_by_side_pairs_changed_lines_and_keeps_the_rest() -> None:
    rows = textdiff.side_by_side("a\nb\nc\nd", "a\nB\nc\nd\ne")
    assert [(r.kind, r.left_no, r.left, r.right_no, r.right) for r in rows] == [
        ("same", 1, "a", 1, "a"), ("changed", 2, "b", 2, "B"), ("same", 3, "c", 3, "c"), ("same", 4, "d", 4, "d"),
        ("added", None, None, 5, "e")]
    assert [r.kind for r in textdiff.side_by_side("x\ny", "y")] == ["removed", "same"]
    assert textdiff.side_by_side("", "") == []


def test_graph_geometry_from_the_laid_out_graph() -> None:
    laid_out = {"start_node": "a", "nodes": [
        {"id": "a", "type": "sequence", "position": {"x": 0, "y": 0}, "data": {"label": "First step of all of them"}},
        {"id": "b", "type": "terminate", "position": {"x": 0, "y": 140}, "data": {"label": None}}],
        "edges": [{"source": "a", "target": "b", "kind": "next", "label": None},
                  {"source": "b", "target": "a", "kind": "loop_body", "label": "again"},
                  {"source": "a", "target": "gone", "kind": "next", "label": None}]}
    drawn = graph.drawing(laid_out, {"a": {"status": "completed"}})
    assert [(b.id, b.status, b.is_start, b.caption) for b in drawn.boxes] == [
        ("a", "completed", True, "completed · First step of all…"), ("b", None, False, "b")]
    down, back = drawn.lines  # the edge to an unknown node is left out
    assert down.path == "M110,56 C110,98 110,98 110,140"  # bottom centre to top centre
    assert (down.back, back.back, back.label) == (False, True, "again")
    assert drawn.view_box == "-150 -40 520 276"
    assert drawn.data == {  # what graph.js lays out with dagre: the edge to an unknown node left out there too
        "start": "a", "status": {"a": "completed"},
        "nodes": [{"id": "a", "type": "sequence", "label": "First step of all of them"},
                  {"id": "b", "type": "terminate", "label": "b"}],
        "edges": [{"id": "a->b#0", "source": "a", "target": "b", "kind": "next", "label": None},
                  {"id": "b->a#1", "source": "b", "target": "a", "kind": "loop_body", "label": "again"}]}
    assert graph.drawing({}).boxes == []
