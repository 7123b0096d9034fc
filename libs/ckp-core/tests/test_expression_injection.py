"""Values are never pasted into expression text: data that looks like operators cannot change the parse."""

from typing import Any

import pytest

from ckp_core.expressions import MappingScope, evaluate, parse_expression
from ckp_core.templates import compile_template, render

pytestmark = pytest.mark.unit

TRICKY = [
    "a contains b",
    "x and y",
    "true or true",
    "1 == 1",
    "{{secret}}",
    "') or ('1' == '1",
    "__import__('os').system('true')",
    "not_in",
    "}} {{",
]


@pytest.mark.parametrize("value", TRICKY)
def test_operator_like_values_are_plain_data(value: str) -> None:
    scope = MappingScope({"v": value, "secret": "leaked"})
    assert evaluate(parse_expression("v == 'nothing'"), scope) is False
    assert evaluate(parse_expression("v"), scope) == value
    assert evaluate(parse_expression("{{v}} == v"), scope) is True
    assert evaluate(parse_expression("len(v)"), scope) == len(value)
    assert evaluate(parse_expression("is_empty v"), scope) is False


@pytest.mark.parametrize("value", TRICKY)
def test_templates_are_single_pass(value: str) -> None:
    scope = MappingScope({"v": value, "secret": "leaked"})
    assert render(compile_template("{{v}}"), scope) == value
    assert render(compile_template("[{{v}}]"), scope) == f"[{value}]"


def test_parse_does_not_depend_on_values() -> None:
    expr = parse_expression("a contains b")
    scopes: list[dict[str, Any]] = [
        {"a": "x and y", "b": "and"},
        {"a": ["a contains b"], "b": "a contains b"},
        {"a": {"or": 1}, "b": "or"},
    ]
    assert [evaluate(expr, MappingScope(s)) for s in scopes] == [True, True, True]
