"""The console's pure parts: the start form from a ``variables_schema`` (the API's flat form) — which fields, in
which order, with which hints and choices, and what a submitted form becomes as ``input_vars`` — and the
side-by-side lines of the version diff."""

from __future__ import annotations

import pytest

from langorch_gateway.ui import forms, textdiff

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
