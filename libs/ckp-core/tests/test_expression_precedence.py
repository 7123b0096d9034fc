"""Operator precedence, associativity and boolean logic of the expression grammar (ckp.md §5.3)."""

from typing import Any

import pytest

from ckp_core.expressions import (
    Arith,
    BoolOp,
    Compare,
    MappingScope,
    Not,
    evaluate,
    parse_expression,
)

pytestmark = pytest.mark.unit


def ev(source: str, **variables: Any) -> Any:
    return evaluate(parse_expression(source), MappingScope(variables))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),
        ("2 * 3 % 4", 2),
        ("100 / 10 / 5", 2.0),
        ("-2 * 3", -6),
        ("- -2", 2),
        ("2 - -2", 4),
        ("1 + 2 == 3", True),
        ("7 % 3 * 2", 2),
    ],
)
def test_arithmetic_precedence(source: str, expected: Any) -> None:
    assert ev(source) == expected


def test_and_binds_tighter_than_or() -> None:
    assert ev("true or false and false") is True
    assert ev("(true or false) and false") is False
    ast = parse_expression("a or b and c").ast
    assert isinstance(ast, BoolOp)
    assert ast.op == "or"
    assert isinstance(ast.operands[1], BoolOp)
    assert ast.operands[1].op == "and"


def test_not_binds_looser_than_comparison() -> None:
    ast = parse_expression("not a == b").ast
    assert isinstance(ast, Not)
    assert isinstance(ast.operand, Compare)
    assert ev("not 1 == 2") is True
    assert ev("not not 1") is True


def test_comparison_binds_looser_than_arithmetic() -> None:
    ast = parse_expression("a + 1 > b * 2").ast
    assert isinstance(ast, Compare)
    assert ast.op == ">"
    assert isinstance(ast.left, Arith)
    assert isinstance(ast.right, Arith)


def test_and_or_return_booleans_and_short_circuit() -> None:
    assert ev("1 and 'x'") is True
    assert ev("0 or ''") is False
    # The right side would fail (division by zero) if it were evaluated.
    assert ev("false and 1 / 0 > 1") is False
    assert ev("true or 1 / 0 > 1") is True


def test_keywords_and_literals_are_case_insensitive() -> None:
    assert ev("TRUE And NOT False") is True
    assert ev("Null == null") is True
    assert ev("'a' IN ['a']") is True
    assert ev("IS_EMPTY x", x=None) is True


def test_none_yes_no_are_ordinary_names() -> None:
    assert ev("None", **{"None": 5}) == 5
    assert ev("yes + no", yes=1, no=2) == 3


def test_bare_paths_and_placeholders_are_equivalent() -> None:
    variables = {"api_response": {"id": 7}}
    assert ev("{{api_response.id}} > 0", **variables) is True
    assert ev("api_response.id > 0", **variables) is True
    assert ev("{{ api_response.id }} * 2", **variables) == 14


def test_placeholder_is_a_parenthesised_subexpression() -> None:
    assert ev("{{ 1 + 2 }} * 3") == 9
    assert ev("{{a or b}} and c", a=False, b=True, c=True) is True


def test_not_in_two_words_and_underscore_form() -> None:
    assert ev("'z' not in ['a']") is True
    assert ev("'z' not_in ['a']") is True
    assert ev("'a' not in ['a']") is False


def test_is_empty_takes_an_additive_operand() -> None:
    assert ev("is_empty a + b", a="", b="") is True
    assert ev("is_not_empty a + b", a="", b="x") is True
    assert ev("not is_empty xs", xs=[]) is False


def test_method_call_sugar() -> None:
    assert ev("name.upper()", name="ab") == "AB"
    assert ev("name.replace('a', 'b').upper()", name="aa") == "BB"
    assert ev("invoices.sum(amount)", invoices=[{"amount": 1}, {"amount": 2}]) == 3
    assert ev("order.lines.count()", order={"lines": [1, 2, 3]}) == 3


def test_whitespace_is_insignificant() -> None:
    assert ev("  a\n  .\n b  [ 0 ]\t+1 ", a={"b": [1]}) == 2


def test_long_flat_chains_do_not_recurse() -> None:
    source = " + ".join(["1"] * 2000)
    assert ev(source) == 2000
    assert ev(" and ".join(["true"] * 800)) is True
