"""Run-input validation (ckp.md §2.2): coercion, constraints, every failing field at once."""

from __future__ import annotations

import pytest

from ckp_core.analysis import explain
from ckp_core.compiler import compile_document
from ckp_core.errors import InvalidInputVars
from ckp_core.ids import decode_token, encode_token
from ckp_core.variables import validate_inputs

pytestmark = pytest.mark.unit

ORDER_TRIAGE = {
    "procedure_id": "order_triage", "version": "1.0.0",
    "variables_schema": {
        "required": {"order_total": {"type": "number", "validation": {"min": 0}}},
        "optional": {"vip": {"type": "boolean", "default": False},
                     "region": {"type": "string", "default": "eu", "validation": {"allowed_values": ["eu", "us"]}}}},
    "workflow_graph": {"start_node": "end", "nodes": {"end": {"type": "terminate"}}},
}


def variables() -> dict:  # type: ignore[type-arg]
    ir = compile_document(ORDER_TRIAGE).ir
    assert ir is not None
    return ir.variables


def test_inputs_are_coerced_and_defaults_applied() -> None:
    assert validate_inputs(variables(), {"order_total": "100", "vip": "true"}) == {
        "order_total": 100, "vip": True, "region": "eu"}


def test_every_failing_field_is_reported() -> None:
    with pytest.raises(InvalidInputVars) as info:
        validate_inputs(variables(), {"order_total": "abc", "region": "apac"})
    assert info.value.errors == {"input_vars.order_total": ["Must be a number"],
                                 "input_vars.region": ["Must be one of: eu, us"]}


def test_required_and_reserved_names() -> None:
    with pytest.raises(InvalidInputVars) as info:
        validate_inputs(variables(), {"order_total": "  ", "run_id": "x"})
    assert info.value.errors == {"input_vars.order_total": ["This field is required"],
                                 "input_vars.run_id": ["Reserved name"]}


@pytest.mark.parametrize("raw", ["NaN", "Infinity", " -Infinity ", "1e999"])
def test_strings_that_are_not_finite_json_numbers_are_not_numbers(raw: str) -> None:
    """§2.2: a string is coerced to a number only when it holds a JSON number; ``json.loads`` also reads NaN and
    the infinities, and NaN passed the ``min: 0`` bound. ``explain`` reports the same through the same validator."""
    with pytest.raises(InvalidInputVars) as info:
        validate_inputs(variables(), {"order_total": raw})
    assert info.value.errors == {"input_vars.order_total": ["Must be a number"]}
    ir = compile_document(ORDER_TRIAGE).ir
    assert ir is not None
    assert explain(ir, {"order_total": raw})["input_errors"] == {"input_vars.order_total": ["Must be a number"]}


def test_undeclared_inputs_pass_through() -> None:
    assert validate_inputs(variables(), {"order_total": 1, "extra": [1]})["extra"] == [1]


def test_template_default_is_rendered_against_inputs_and_builtins() -> None:
    doc = dict(ORDER_TRIAGE, variables_schema={"a": {"type": "string", "default": "x"},
                                               "b": {"type": "string", "default": "{{a}}-{{run_id}}"}})
    ir = compile_document(doc).ir
    assert ir is not None
    assert validate_inputs(ir.variables, {"a": "y"}, {"run_id": "r1"})["b"] == "y-r1"


@pytest.mark.parametrize(("raw", "encoded"), [("invoice.v2", "invoice~2Ev2"), ("abc-_1", "abc-_1"),
                                              ("a b*>", "a~20b~2A~3E")])
def test_subject_tokens_are_encoded_reversibly(raw: str, encoded: str) -> None:
    assert encode_token(raw) == encoded
    assert decode_token(encoded) == raw


def test_an_integer_beyond_a_float_is_an_integer() -> None:
    """float(10**400) overflows: an int is an integer without converting it (the compiler raised on such a
    default; hypothesis found it)."""
    spec = {"type": "integer", "default": 10**400}
    doc = {"procedure_id": "big", "version": "1", "variables_schema": {"n": spec},
           "workflow_graph": {"start_node": "end", "nodes": {"end": {"type": "terminate"}}}}
    result = compile_document(doc)
    assert result.ir is not None
    assert validate_inputs(result.ir.variables, {"n": 10**400}) == {"n": 10**400}
    spec["validation"] = {"max": 5}
    assert [(d.code, d.path) for d in compile_document(doc).diagnostics] == [
        ("invalid_default", "/variables_schema/n/default")]
