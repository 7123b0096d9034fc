"""Equality, ordering, membership, affix and regex operators (ckp.md §5.4)."""

from typing import Any

import pytest

from ckp_core.expressions import ExpressionError, MappingScope, evaluate, parse_expression

pytestmark = pytest.mark.unit


def ev(source: str, **variables: Any) -> Any:
    return evaluate(parse_expression(source), MappingScope(variables))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 == 1.0", True),
        ("'10' == 10", True),
        ("10 == ' 10 '", True),
        ("'1e1' == 10", True),
        ("'10' == '10.0'", False),  # two strings compare as strings
        ("'abc' == 0", False),
        ("true == 1", False),  # booleans are not numbers
        ("true == 'true'", False),
        ("null == 0", False),
        ("[1, '2'] == [1.0, 2]", True),
        ("x == y", True),
        ("[1] == [1, 1]", False),
    ],
)
def test_deep_equality(source: str, expected: Any) -> None:
    assert ev(source, x={"a": [1, 2]}, y={"a": [1, 2.0]}) is expected


def test_object_equality_ignores_key_order() -> None:
    assert ev("a == b", a={"x": 1, "y": 2}, b={"y": 2, "x": 1}) is True
    assert ev("a != b", a={"x": 1}, b={"x": 1, "y": None}) is True


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("2 < 10", True),
        ("'2' < 10", True),  # numeric string against number: numeric
        ("10 <= '10.0'", True),
        ("'b' > 'a'", True),
        ("'10' < '9'", True),  # two strings: code-point order
        ("'Z' < 'a'", True),
        ("1.5 >= 1", True),
    ],
)
def test_ordering(source: str, expected: bool) -> None:
    assert ev(source) is expected


@pytest.mark.parametrize(
    "source", ["'abc' < 1", "true < 1", "[1] < [2]", "{{o}} > 1", "true > false", "'a' >= [1]"]
)
def test_invalid_ordering_mixes_raise(source: str) -> None:
    with pytest.raises(ExpressionError) as info:
        ev(source, o={})
    assert "cannot compare" in info.value.reason
    assert info.value.details()["expression"] == source


def test_membership() -> None:
    assert ev("2 in [1, 2]") is True
    assert ev("'2' in [1, 2]") is True  # membership uses ==
    assert ev("'ell' in 'hello'") is True
    assert ev("'k' in o", o={"k": None}) is True
    assert ev("'z' not in o", o={"k": 1}) is True
    assert ev("items contains item", items=[{"a": 1}], item={"a": 1.0}) is True
    assert ev("'hello' not_contains 'z'") is True
    assert ev("'v1.5' contains 1.5") is True
    with pytest.raises(ExpressionError):
        ev("1 in 5")
    with pytest.raises(ExpressionError):
        ev("[1] in 'abc'")


def test_affixes() -> None:
    assert ev("'eu-west' starts_with 'eu'") is True
    assert ev("'file.json' ends_with '.json'") is True
    assert ev("12345 starts_with 123") is True
    assert ev("2.5 ends_with '.5'") is True
    with pytest.raises(ExpressionError):
        ev("[1] starts_with 'a'")


def test_regex_is_a_search_with_re2_semantics() -> None:
    assert ev("'order-123' matches '[0-9]+'") is True
    assert ev("'order-123' matches '^[0-9]+$'") is False
    assert ev(r"'a1' matches '\d'") is True  # unknown escapes keep their backslash
    assert ev("s matches p", s="ABC", p="(?i)abc") is True
    assert ev("s matches p", s="x", p=None) is False


def test_runtime_invalid_regex_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError) as info:
        ev("'aa' matches p", p="(a)\\1")
    assert info.value.reason.startswith("invalid regex")
    with pytest.raises(ExpressionError):
        ev("'aa' matches p", p="a" * 2000)
    with pytest.raises(ExpressionError):
        ev("'aa' matches 5")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("7 / 2", 3.5),
        ("4 / 2", 2.0),
        ("7 % 3", 1),
        ("-7 % 3", 2),
        ("7 % -3", -2),
        ("7.5 % 2", 1.5),
        ("'a' + 'b'", "ab"),
        ("[1] + [2, 3]", [1, 2, 3]),
        ("1 + 2.0", 3.0),
    ],
)
def test_arithmetic(source: str, expected: Any) -> None:
    result = ev(source)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    "source", ["1 / 0", "1 % 0", "1.0 / 0.0", "'a' + 1", "'2' + 1", "[1] + 'a'", "true + 1", "'a' * 2",
               "-'a'", "1e308 * 10"],
)
def test_arithmetic_errors(source: str) -> None:
    with pytest.raises(ExpressionError) as info:
        ev(source)
    details = info.value.details()
    assert set(details) == {"expression", "position", "reason"}
    assert 0 <= details["position"] < len(source)


def test_error_position_points_at_operator() -> None:
    with pytest.raises(ExpressionError) as info:
        ev("a + b / 0", a=1, b=2)
    assert info.value.position == 6
