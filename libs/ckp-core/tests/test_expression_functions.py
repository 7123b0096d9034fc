"""The function library of ckp.md §5.5."""

from typing import Any

import pytest

from ckp_core.expressions import ExpressionError, MappingScope, evaluate, parse_expression

pytestmark = pytest.mark.unit

INVOICES = [{"amount": 10, "customer": {"tier": "gold"}}, {"amount": 2.5}, {"amount": None}, {"other": 1}]


def ev(source: str, **variables: Any) -> Any:
    return evaluate(parse_expression(source), MappingScope(variables))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("len('héllo')", 5),
        ("len([1, 2])", 2),
        ("len(o)", 1),
        ("len(missing)", 0),
        ("lower('AbC')", "abc"),
        ("upper('abc')", "ABC"),
        ("trim('  a b  ')", "a b"),
        ("lower(missing)", None),
        ("replace('a-b-c', '-', '+')", "a+b+c"),
        ("split('a,b,,c', ',')", ["a", "b", "", "c"]),
        ("split('ab', '')", ["a", "b"]),
        ("join(['a', 1, 2.0, true, null, [1]])", "a,1,2.0,true,,[1]"),
        ("join(['a', 'b'], ' | ')", "a | b"),
        ("int(3.9)", 3),
        ("int(-3.9)", -3),
        ("int(' 42 ')", 42),
        ("int('2.7')", 2),
        ("int(missing)", None),
        ("float(2)", 2.0),
        ("float('1e3')", 1000.0),
        ("str(120.0)", "120.0"),
        ("str(1e-7)", "1e-07"),
        ("str(null)", ""),
        ("str(o)", '{"k":"v"}'),
        ("bool('No')", False),
        ("bool(' YES ')", True),
        ("bool('0')", False),
        ("bool('false')", False),
        ("bool('nope')", True),
        ("bool(0)", False),
        ("bool([])", False),
        ("coalesce(missing, null, 0, 1)", 0),
        ("coalesce(missing)", None),
        ("if(1 > 0, 'a', 'b')", "a"),
        ("if('', 'a', 'b')", "b"),
        ("round(2.5)", 2),
        ("round(3.5)", 4),
        ("round(-2.5)", -2),
        ("round(2.675, 2)", 2.68),
        ("round(1.2345, 3)", 1.234),
        ("round(1250, -2)", 1200),
        ("round(7)", 7),
        ("round(missing)", None),
        ("abs(-3)", 3),
        ("abs(-2.5)", 2.5),
        ("keys(o)", ["k"]),
        ("values(o)", ["v"]),
        ("json([1, o])", '[1,{"k":"v"}]'),
        ("json('é')", '"é"'),
        ("json(null)", "null"),
        ("json('x')", '"x"'),
    ],
)
def test_functions(source: str, expected: Any) -> None:
    result = ev(source, o={"k": "v"})
    assert result == expected
    assert type(result) is type(expected)


def test_if_evaluates_only_the_chosen_branch() -> None:
    assert ev("if(true, 1, 1 / 0)") == 1
    assert ev("if(false, 1 / 0, 2)") == 2
    assert ev("coalesce(1, 1 / 0)") == 1


def test_aggregates_over_items_and_fields() -> None:
    assert ev("count(xs)", xs=[1, None, 2]) == 2
    assert ev("sum(xs)", xs=[1, None, 2]) == 3
    assert ev("sum(xs)", xs=[]) == 0
    assert ev("count(xs)", xs=[]) == 0
    assert ev("avg(xs)", xs=[]) is None
    assert ev("min(xs)", xs=[]) is None
    assert ev("max(missing)") is None
    assert ev("sum(invoices, amount)", invoices=INVOICES) == 12.5
    assert ev("invoices.sum(amount)", invoices=INVOICES) == 12.5
    assert ev("sum(invoices, 'amount')", invoices=INVOICES) == 12.5
    assert ev("invoices.count(amount)", invoices=INVOICES) == 2
    assert ev("invoices.avg(amount)", invoices=INVOICES) == 6.25
    assert ev("invoices.min(amount)", invoices=INVOICES) == 2.5
    assert ev("invoices.max(amount)", invoices=INVOICES) == 10
    assert ev("invoices.count(customer.tier)", invoices=INVOICES) == 1
    assert ev("max(xs)", xs=["b", "c", "a"]) == "c"
    assert ev("avg(xs)", xs=[1, 2]) == 1.5


def test_aggregate_field_name_is_not_a_variable() -> None:
    expr = parse_expression("invoices.sum(amount) + count(items, 'qty')")
    assert expr.referenced_roots == frozenset({"invoices", "items"})
    # A variable named like the field does not change the result.
    assert ev("sum(invoices, amount)", invoices=INVOICES, amount="customer") == 12.5


def test_now_and_today_read_the_builtins() -> None:
    assert ev("now()", now="2024-05-01T10:00:00Z") == "2024-05-01T10:00:00Z"
    assert ev("today()", today="2024-05-01") == "2024-05-01"
    assert str(ev("now()")).endswith("Z")
    assert len(str(ev("today()"))) == 10


def test_function_names_are_not_roots() -> None:
    assert parse_expression("len(x) + now()").referenced_roots == frozenset({"x"})


@pytest.mark.parametrize(
    "source",
    ["len(5)", "lower(1)", "int('abc')", "int(true)", "float([1])", "abs('x')", "round('1')",
     "round(1.5, 0.5)", "sum(['a'])", "sum(5)", "avg([true])", "min([[1]])", "max([1, 'a'])",
     "keys([1])", "values('x')", "join('ab')", "split(1, ',')", "replace('a', 1, 'b')"],
)
def test_function_type_errors(source: str) -> None:
    with pytest.raises(ExpressionError):
        ev(source)
