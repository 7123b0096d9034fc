"""Transform node transformations (ckp.md §3.14) through ``langorch_runtime.transforms`` with compiled IR."""

from __future__ import annotations

from typing import Any

import pytest

from ckp_core.expressions import MappingScope
from langorch_runtime.errors import StepError
from langorch_runtime.transforms import ItemScope, field_value, run_transformation
from runtime_ir_support import render_params, transformation

pytestmark = pytest.mark.unit

ORDERS = [
    {"id": 1, "customer": {"region": "eu"}, "amount": 10, "status": "paid"},
    {"id": 2, "customer": {"region": "us"}, "amount": 25.5, "status": "open"},
    {"id": 3, "customer": {"region": "eu"}, "amount": None, "status": "paid"},
    {"id": 4, "customer": {"region": "eu"}, "amount": 5, "status": "open"},
]


def apply(raw: dict[str, Any], variables: dict[str, Any] | None = None,
          builtins: dict[str, Any] | None = None) -> Any:
    t = transformation({"output_variable": "out", **raw})
    variables = variables if variables is not None else {"orders": ORDERS}
    return run_transformation(t, render_params(t.params, variables), variables, builtins or {})


def error_of(raw: dict[str, Any], variables: dict[str, Any] | None = None) -> dict[str, Any]:
    with pytest.raises(StepError) as info:
        apply(raw, variables)
    return info.value.error.model_dump()


# -- source rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variables", [{}, {"orders": None}, {"orders": []}, {"wrapper": {}}])
@pytest.mark.parametrize(("raw", "empty"), [
    ({"type": "filter", "expression": "amount > 1"}, []),
    ({"type": "map", "expression": "id"}, []),
    ({"type": "reduce", "expression": "acc + amount", "params": {"initial": 0}}, 0),
    ({"type": "join"}, ""),
    ({"type": "aggregate", "expression": "count, count(amount), sum(amount), avg(amount), min(amount), max(amount)"},
     {"count": 0, "count_amount": 0, "sum_amount": 0, "avg_amount": None, "min_amount": None, "max_amount": None}),
    ({"type": "aggregate", "expression": "count", "params": {"group_by": "status"}}, []),
    ({"type": "pivot", "params": {"index": "id", "columns": "status", "values": "amount"}}, []),
    ({"type": "sort", "params": {"key": "id"}}, []),
    ({"type": "unique"}, []),
])
def test_undefined_null_and_empty_sources(raw: dict[str, Any], empty: Any, variables: dict[str, Any]) -> None:
    source = "wrapper.orders" if "wrapper" in variables else "orders"
    assert apply({"source_variable": source, **raw}, variables) == empty


@pytest.mark.parametrize("value", [{"a": 1}, "text", 3, True])
def test_non_list_source_fails(value: Any) -> None:
    error = error_of({"type": "map", "source_variable": "orders", "expression": "item"}, {"orders": value})
    assert error["code"] == "operation_failed"
    assert error["details"] == {"reason": "source_not_a_list", "index": 0, "type": "map"}


def test_source_path_and_builtins() -> None:
    t = transformation({"type": "map", "source_variable": "data.rows[1]", "expression": "item + offset + bonus",
                        "output_variable": "out"})
    variables = {"data": {"rows": [[0], [1, 2]]}, "offset": 10}
    assert run_transformation(t, {}, variables, {"bonus": 100}) == [111, 112]
    assert run_transformation(t, {}, MappingScope(variables, {"bonus": 1})) == [12, 13]


# -- per-item scope ----------------------------------------------------------------------------------------------


def test_item_scope_resolution_order() -> None:
    base = MappingScope({"status": "variable", "limit": 5, "item": "shadowed"}, {"run_id": "r"})
    scope = ItemScope(base, {"item": {"status": "field", "index": "field-index"}, "index": 2})
    assert scope.lookup("item") == (True, {"status": "field", "index": "field-index"})
    assert scope.lookup("index") == (True, 2)
    assert scope.lookup("status") == (True, "field")
    assert scope.lookup("limit") == (True, 5)
    assert scope.lookup("run_id") == (True, "r")
    assert scope.lookup("nothing") == (False, None)
    scalar = ItemScope(base, {"item": 7, "index": 0})
    assert scalar.lookup("status") == (True, "variable")


def test_filter_map_reduce() -> None:
    assert apply({"type": "filter", "source_variable": "orders", "expression": "status == wanted and amount > 5"},
                 {"orders": ORDERS, "wanted": "open"}) == [ORDERS[1]]
    assert apply({"type": "filter", "source_variable": "orders", "expression": "amount"}) == [ORDERS[0], ORDERS[1],
                                                                                               ORDERS[3]]
    assert apply({"type": "map", "source_variable": "orders", "expression": "[index, customer.region, amount]"}) == [
        [0, "eu", 10], [1, "us", 25.5], [2, "eu", None], [3, "eu", 5]]
    assert apply({"type": "map", "source_variable": "nums", "expression": "item * 2"},
                 {"nums": [1, 2.5, -3]}) == [2, 5.0, -6]
    assert apply({"type": "reduce", "source_variable": "orders", "expression": "acc + coalesce(amount, 0)",
                  "params": {"initial": 0}}) == 40.5
    assert apply({"type": "reduce", "source_variable": "nums", "expression": "acc + [item * index]",
                  "params": {"initial": "{{seed}}"}}, {"nums": [5, 6], "seed": [9]}) == [9, 0, 6]
    assert apply({"type": "reduce", "source_variable": "nums", "expression": "acc"}, {"nums": [1]}) is None


def test_expression_errors_name_the_item() -> None:
    error = error_of({"type": "map", "source_variable": "orders", "expression": "amount * 'x'"})
    assert error["code"] == "expression_error"
    assert error["details"]["item_index"] == 0
    assert error["details"]["index"] == 0
    assert error["details"]["expression"] == "amount * 'x'"


def test_join() -> None:
    assert apply({"type": "join", "source_variable": "xs"}, {"xs": ["a", 1, 2.0, None, True, {"k": 1}]}) == \
        'a, 1, 2.0, , true, {"k":1}'
    assert apply({"type": "join", "source_variable": "orders", "expression": "id", "params": {"separator": "|"}}) == \
        "1|2|3|4"
    assert apply({"type": "join", "source_variable": "xs", "params": {"separator": "{{sep}}"}},
                 {"xs": [1, 2], "sep": 0}) == "102"


# -- aggregate, pivot --------------------------------------------------------------------------------------------


def test_aggregate() -> None:
    assert apply({"type": "aggregate", "source_variable": "orders",
                  "expression": "count, count(amount), sum(amount) as total, avg(amount), min(amount), max(id)"}) == {
        "count": 4, "count_amount": 3, "total": 40.5, "avg_amount": 13.5, "min_amount": 5, "max_id": 4}
    rows = [{"a": {"b": 2}}, {"a": {"b": 4}}, {"a": None}]
    assert apply({"type": "aggregate", "source_variable": "rows", "expression": "sum(a.b), avg(a.b)"},
                 {"rows": rows}) == {"sum_a_b": 6, "avg_a_b": 3.0}


def test_aggregate_group_by() -> None:
    assert apply({"type": "aggregate", "source_variable": "orders", "expression": "count, sum(amount)",
                  "params": {"group_by": "customer.region"}}) == [
        {"region": "eu", "count": 3, "sum_amount": 15},
        {"region": "us", "count": 1, "sum_amount": 25.5},
    ]
    rows = [{"k": None, "v": 1}, {"k": 1, "v": 2}, {"k": None, "v": 3}, {"v": 4}]
    assert apply({"type": "aggregate", "source_variable": "rows", "expression": "count, max(v) as top",
                  "params": {"group_by": "k"}}, {"rows": rows}) == [
        {"k": None, "count": 3, "top": 4}, {"k": 1, "count": 1, "top": 2}]


@pytest.mark.parametrize("bad", ["3", True, [1], {"x": 1}])
def test_aggregate_non_numeric(bad: Any) -> None:
    for fn in ("sum", "avg", "min", "max"):
        error = error_of({"type": "aggregate", "source_variable": "rows", "expression": f"{fn}(v)"},
                         {"rows": [{"v": 1}, {"v": bad}]})
        assert error["details"]["reason"] == "non_numeric"
    assert apply({"type": "aggregate", "source_variable": "rows", "expression": "count(v)"},
                 {"rows": [{"v": 1}, {"v": bad}]}) == {"count_v": 2}


SALES = [
    {"region": "eu", "q": "Q1", "amount": 10},
    {"region": "us", "q": "Q1", "amount": 7},
    {"region": "eu", "q": "Q2", "amount": 3},
    {"region": "eu", "q": "Q1", "amount": 5},
    {"region": "us", "q": 2, "amount": None},
]


@pytest.mark.parametrize(("how", "eu", "us"), [
    (None, {"Q1": 10, "Q2": 3}, {"Q1": 7, "2": None}),
    ("first", {"Q1": 10, "Q2": 3}, {"Q1": 7, "2": None}),
    ("last", {"Q1": 5, "Q2": 3}, {"Q1": 7, "2": None}),
    ("count", {"Q1": 2, "Q2": 1}, {"Q1": 1, "2": 0}),
    ("sum", {"Q1": 15, "Q2": 3}, {"Q1": 7, "2": 0}),
    ("avg", {"Q1": 7.5, "Q2": 3.0}, {"Q1": 7.0, "2": None}),
    ("min", {"Q1": 5, "Q2": 3}, {"Q1": 7, "2": None}),
    ("max", {"Q1": 10, "Q2": 3}, {"Q1": 7, "2": None}),
])
def test_pivot(how: str | None, eu: dict[str, Any], us: dict[str, Any]) -> None:
    params: dict[str, Any] = {"index": "region", "columns": "q", "values": "amount"}
    if how is not None:
        params["aggregate"] = how
    assert apply({"type": "pivot", "source_variable": "sales", "params": params}, {"sales": SALES}) == [
        {"region": "eu", **eu}, {"region": "us", **us}]


def test_pivot_absent_combinations_and_nested_paths() -> None:
    rows = [{"who": {"name": "a"}, "col": True, "val": {"n": 1}}, {"who": {"name": "b"}, "col": 1.5, "val": {"n": 2}}]
    assert apply({"type": "pivot", "source_variable": "rows",
                  "params": {"index": "who.name", "columns": "col", "values": "val.n"}}, {"rows": rows}) == [
        {"name": "a", "true": 1}, {"name": "b", "1.5": 2}]
    error = error_of({"type": "pivot", "source_variable": "rows",
                      "params": {"index": "who", "columns": "col", "values": "who", "aggregate": "sum"}},
                     {"rows": rows})
    assert error["details"]["reason"] == "non_numeric"


# -- sort, deduplicate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "expression", "expected_ids"), [
    ({"key": "amount"}, None, [4, 1, 2, 3]),
    ({"key": "amount", "descending": True}, None, [2, 1, 4, 3]),
    ({"key": "status"}, None, [2, 4, 1, 3]),
    ({"key": "status", "descending": "{{desc}}"}, None, [1, 3, 2, 4]),
    ({}, "customer.region", [1, 3, 4, 2]),
    ({"descending": True}, "customer.region", [2, 1, 3, 4]),
    ({"key": "missing"}, None, [1, 2, 3, 4]),
])
def test_sort_is_stable_with_nulls_last(params: dict[str, Any], expression: str | None,
                                        expected_ids: list[int]) -> None:
    raw: dict[str, Any] = {"type": "sort", "source_variable": "orders", "params": params}
    if expression:
        raw["expression"] = expression
    result = apply(raw, {"orders": ORDERS, "desc": True})
    assert [o["id"] for o in result] == expected_ids


def test_sort_scalars_and_mixed_numbers() -> None:
    assert apply({"type": "sort", "source_variable": "xs", "expression": "item"}, {"xs": [3, None, 1.5, 2]}) == \
        [1.5, 2, 3, None]
    assert apply({"type": "sort", "source_variable": "xs", "expression": "item", "params": {"descending": True}},
                 {"xs": [None, "b", "a", "B"]}) == ["b", "a", "B", None]
    assert apply({"type": "sort", "source_variable": "xs", "expression": "item"}, {"xs": [True, False]}) == \
        [False, True]


@pytest.mark.parametrize("keys", [[1, "1"], [True, 1], [[1], [2]], [{"a": 1}, {"a": 2}], ["a", 2.5]])
def test_sort_incomparable_keys(keys: list[Any]) -> None:
    error = error_of({"type": "sort", "source_variable": "xs", "expression": "item"}, {"xs": keys})
    assert error["code"] == "operation_failed"
    assert error["details"]["reason"] == "incomparable_keys"
    assert error["details"]["type"] == "sort"


def test_deduplicate() -> None:
    # compared as JSON values: 1 and 1.0 are one number (also nested), true is not 1, "1" is a string
    xs = [{"a": 1, "b": 2}, {"b": 2.0, "a": 1}, 1, 1.0, "1", None, None, [1], [1.0], True, 1.5, 1.5]
    out = apply({"type": "deduplicate", "source_variable": "xs"}, {"xs": xs})
    assert out == [{"a": 1, "b": 2}, 1, "1", None, [1], True, 1.5]
    assert [type(x) for x in out[1:3]] == [int, str]
    assert [o["id"] for o in apply({"type": "unique", "source_variable": "orders",
                                    "params": {"key": "customer.region"}})] == [1, 2]
    assert [o["id"] for o in apply({"type": "deduplicate", "source_variable": "orders",
                                    "expression": "status + '-' + str(amount > 6)"})] == [1, 2, 3, 4]
    assert [o["id"] for o in apply({"type": "deduplicate", "source_variable": "orders",
                                    "expression": "status"})] == [1, 2]


def test_field_paths_into_items() -> None:
    item = {"a": {"b": [10, {"c": 3}]}, "odd key": 1, "x.y": "literal"}
    assert field_value(item, "a.b[1].c") == 3
    assert field_value(item, "a.b[-2]") == 10
    assert field_value(item, "a.b.length") == 2
    assert field_value(item, "odd key") == 1
    assert field_value(item, "x.y") == "literal"
    assert field_value(item, "a.missing.deeper") is None
    assert field_value(5, "a") is None
    with pytest.raises(StepError):
        field_value(item, "")
