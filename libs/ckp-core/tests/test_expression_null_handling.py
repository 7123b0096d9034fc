"""null semantics, unresolved paths and their reasons (ckp.md §5.2, §5.4)."""

from typing import Any

import pytest

from ckp_core.expressions import MappingScope, evaluate, parse_expression, truthy

pytestmark = pytest.mark.unit


def ev_reported(source: str, **variables: Any) -> tuple[Any, list[tuple[str, str]]]:
    reported: list[tuple[str, str]] = []
    value = evaluate(parse_expression(source), MappingScope(variables),
                     lambda root, reason: reported.append((root, reason)))
    return value, reported


def ev(source: str, **variables: Any) -> Any:
    return evaluate(parse_expression(source), MappingScope(variables))


DATA = {"order": {"lines": [{"sku": "a"}, {"sku": "b"}], "note": None, "length": 9}, "name": "abc"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("missing", ("missing", "undefined")),
        ("missing.a.b", ("missing", "undefined")),
        ("order.nope", ("order", "missing_key")),
        ("order.nope.deeper", ("order", "missing_key")),
        ("order.lines[5]", ("order", "index_out_of_range")),
        ("order.lines[-3]", ("order", "index_out_of_range")),
        ("order.note.x", ("order", "not_a_container")),
        ("name.first", ("name", "not_a_container")),
        ("order.lines.sku", ("order", "missing_key")),
    ],
)
def test_unresolved_paths_are_null_and_reported_once(source: str, expected: tuple[str, str]) -> None:
    value, reported = ev_reported(source, **DATA)
    assert value is None
    assert reported == [expected]


def test_resolved_paths() -> None:
    value, reported = ev_reported("order.lines[-1].sku", **DATA)
    assert (value, reported) == ("b", [])
    assert ev("order.lines.1.sku", **DATA) == "b"
    assert ev("order['lines'][0]['sku']", **DATA) == "a"
    assert ev("order.lines.length", **DATA) == 2
    assert ev("name.length", **DATA) == 3
    assert ev("order.length", **DATA) == 9  # an object's own "length" key is a normal key
    assert ev("order.note", **DATA) is None
    assert ev("vars['odd key']", vars={"odd key": 1}) == 1


def test_first_scope_layer_wins() -> None:
    scope = MappingScope({"x": 1}, {"x": 2, "y": 3})
    assert evaluate(parse_expression("x + y"), scope) == 4
    assert scope.lookup("z") == (False, None)


def test_null_in_comparisons_is_false() -> None:
    for op in ("<", "<=", ">", ">="):
        assert ev(f"missing {op} 1") is False
        assert ev(f"1 {op} null") is False
    assert ev("null == null") is True
    assert ev("missing == null") is True
    assert ev("missing != 0") is True


def test_null_propagates_through_arithmetic() -> None:
    assert ev("missing + 1") is None
    assert ev("1 - null") is None
    assert ev("null * 2") is None
    assert ev("null / 0") is None
    assert ev("-missing") is None


def test_null_containers_and_affixes() -> None:
    assert ev("'a' in missing") is False
    assert ev("'a' not in missing") is True
    assert ev("missing contains 'a'") is False
    assert ev("missing not_contains 'a'") is True
    assert ev("missing starts_with 'a'") is False
    assert ev("'abc' ends_with missing") is False
    assert ev("missing matches 'a'") is False
    assert ev("5 matches '5'") is False  # non-string left side


def test_emptiness() -> None:
    empties: list[Any] = [None, "", [], {}]
    for value in empties:
        assert ev("is_empty x", x=value) is True
        assert ev("is_not_empty x", x=value) is False
    non_empties: list[Any] = [0, False, " ", [None], {"a": None}]
    for value in non_empties:
        assert ev("is_empty x", x=value) is False
    assert ev("is_empty missing") is True


def test_truthiness() -> None:
    falsy: list[Any] = [None, False, 0, 0.0, "", [], {}]
    for value in falsy:
        assert truthy(value) is False
    truthy_values: list[Any] = ["false", "0", [0], {"a": 0}, -1, 0.1, True]
    for value in truthy_values:
        assert truthy(value) is True
    assert ev("not 'false'") is False


def test_placeholder_fallback_applies_only_to_null() -> None:
    assert ev("{{ missing | 3 }}") == 3
    assert ev("{{ zero | 3 }}", zero=0) == 0
    assert ev("{{ empty | 'x' }}", empty="") == ""
    assert ev("{{ n | 3 }}", n=None) == 3
    assert ev('{{ missing | "x y" }}') == "x y"
    assert ev("{{ missing | 'it''s' }}") == "'it''s'"  # not a single literal: bare text
    assert ev("{{ missing | some words here }}") == "some words here"
    assert ev("{{ missing | TRUE }}") is True
    assert ev("{{ missing | null }}") is None
    assert ev("{{ missing | [] }}") == []
    assert ev('{{ missing | {"a": {"b": 1}} }}') == {"a": {"b": 1}}
    assert ev("{{ missing | -2.5 }} * 2") == -5.0
    assert ev("{{ missing | }}") == ""


def test_exists_does_not_report() -> None:
    value, reported = ev_reported("exists(order.nope)", **DATA)
    assert (value, reported) == (False, [])
    assert ev("exists(order.note)", **DATA) is True  # resolves to null, still exists
    assert ev("exists(order.lines[1])", **DATA) is True
    assert ev("exists(nothing)") is False
    assert ev("order.lines.exists()", **DATA) is True


def test_unresolved_index_expression_reports_both() -> None:
    value, reported = ev_reported("order.lines[i]", **DATA)
    assert value is None
    assert reported == [("i", "undefined"), ("order", "missing_key")]
