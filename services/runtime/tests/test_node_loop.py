"""The loop node (ckp.md §3.7), run in-process through the interpreter."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_harness import END, calc, doc, error, outputs, run_doc, setv

pytestmark = pytest.mark.unit


# --- §3.7 loop -------------------------------------------------------------------------------------------


async def test_loop_max_iterations_caps_and_reports_total() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[10, 20, 30, 40]", "iterator_variable": "x", "index_variable": "i",
                 "body_node": "body", "collect_variable": "got", "max_iterations": 2, "next_node": "z"},
        "body": {"type": "sequence", "steps": [calc("c", "x + 1", "y")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "x": "{{x}}", "i": "{{i}}"}}}, start="each"))
    assert outputs(run) == {"got": [10, 20], "x": 20, "i": 1}
    [started] = run.of("loop_started")
    assert (started.total, started.iterations) == (4, 2)
    assert len(run.of("loop_iteration")) == 2


async def test_loop_max_iterations_zero_runs_no_iteration_and_writes_empty_lists() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2]", "iterator_variable": "x", "body_node": "body",
                 "collect_variable": "got", "errors_variable": "bad", "max_iterations": 0, "next_node": "z"},
        "body": {"type": "sequence", "steps": [calc("c", "1 / 0")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "bad": "{{bad}}"}}}, start="each"))
    assert outputs(run) == {"got": [], "bad": []}
    completed = run.of("loop_completed")[0]
    assert (completed.iterations, completed.succeeded, completed.failed) == (0, 0, 0)


@pytest.mark.parametrize("iterator", ["missing", "nothing", "{{nothing}}"])
async def test_loop_over_null_or_undefined_is_empty(iterator: str) -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": iterator, "iterator_variable": "x", "body_node": "body",
                 "collect_variable": "got", "next_node": "z"},
        "body": {"type": "sequence", "steps": [calc("c", "1 / 0")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}"}}}, start="each",
        variables_schema={"nothing": {"type": "object", "default": None}, "missing": {"type": "array"}}))
    assert outputs(run) == {"got": []}
    assert run.of("loop_started")[0].iterations == 0


@pytest.mark.parametrize("value", ["abc", {"a": 1}, 5, True])
async def test_loop_over_a_non_list_fails_with_loop_iterator_invalid(value: Any) -> None:
    run = await run_doc(doc({
        "init": {"type": "sequence", "next_node": "each", "steps": [setv("s", "thing", value)]},
        "each": {"type": "loop", "iterator": "thing", "iterator_variable": "x", "body_node": "body",
                 "next_node": "z"},
        "body": {"type": "sequence", "steps": []},
        "z": END}, start="init"))
    assert error(run)["code"] == "loop_iterator_invalid"
    assert run.of("loop_iteration") == []


async def test_loop_collect_default_is_the_original_item_and_expression_sees_body_writes() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "rows", "iterator_variable": "row", "body_node": "body",
                 "collect_variable": "orig", "next_node": "each2"},
        "body": {"type": "sequence", "steps": [setv("s", "row.seen", True)]},
        "each2": {"type": "loop", "iterator": "rows", "iterator_variable": "row", "body_node": "body2",
                  "collect_variable": "changed", "collect_expression": "{{row}}", "next_node": "z"},
        "body2": {"type": "sequence", "steps": [setv("s", "row.seen", True)]},
        "z": {"type": "terminate", "outputs": {"orig": "{{orig}}", "changed": "{{changed}}", "rows": "{{rows}}"}}},
        start="each", variables_schema={"rows": {"type": "array", "default": [{"id": 1}, {"id": 2}]}}))
    out = outputs(run)
    assert out["orig"] == [{"id": 1}, {"id": 2}]
    assert out["changed"] == [{"id": 1, "seen": True}, {"id": 2, "seen": True}]
    assert out["rows"] == [{"id": 1}, {"id": 2}]


async def test_loop_reentry_starts_fresh_collected_and_error_lists() -> None:
    run = await run_doc(doc({
        "init": {"type": "sequence", "next_node": "each", "steps": [setv("s", "round", 0)]},
        "each": {"type": "loop", "iterator": "if(round == 0, [1, 0], [5])", "iterator_variable": "n",
                 "body_node": "body", "collect_variable": "got", "errors_variable": "bad",
                 "continue_on_error": True, "next_node": "again"},
        "body": {"type": "sequence", "steps": [calc("c", "10 / n")]},
        "again": {"type": "logic", "rules": [{"condition": "round == 0", "next_node": "bump"}],
                  "default_next_node": "z"},
        "bump": {"type": "sequence", "next_node": "each", "steps": [setv("s", "round", 1)]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "bad": "{{len(bad)}}"}}}, start="init"))
    assert outputs(run) == {"got": [5], "bad": 0}


async def test_loop_errors_variable_records_iteration_and_error_object() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 0, 2, 0]", "iterator_variable": "n", "body_node": "body",
                 "collect_variable": "got", "collect_expression": "{{q}}", "errors_variable": "bad",
                 "continue_on_error": True, "next_node": "z"},
        "body": {"type": "sequence", "steps": [calc("c", "10 / n", "q")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "bad": "{{bad}}"}}}, start="each"))
    out = outputs(run)
    assert out["got"] == [10, 5]
    assert [b["iteration"] for b in out["bad"]] == [1, 3]
    assert all(b["error"]["code"] == "expression_error" for b in out["bad"])
    assert len(run.of("loop_iteration_failed")) == 2
    completed = run.of("loop_completed")[0]
    assert (completed.iterations, completed.succeeded, completed.failed) == (4, 2, 2)


async def test_loop_body_routing_back_to_the_loop_ends_the_iteration() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2, 3]", "iterator_variable": "n", "body_node": "b1",
                 "collect_variable": "got", "next_node": "z"},
        "b1": {"type": "sequence", "next_node": "b2", "steps": [calc("c", "n * 2", "d")]},
        "b2": {"type": "logic", "rules": [{"condition": "n == 2", "next_node": "each"}], "default_next_node": "b3"},
        "b3": {"type": "sequence", "next_node": "each", "steps": [setv("s", "last_b3", "{{n}}")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "last_b3": "{{last_b3}}"}}}, start="each"))
    assert outputs(run) == {"got": [1, 2, 3], "last_b3": 3}
    assert [e.frame for e in run.of("node_started") if e.node_id == "b3"] == ["each[0]", "each[2]"]
    assert [e.node_id for e in run.of("node_started")].count("each") == 1


async def test_nested_loops_collect_inner_lists_and_builtins_describe_the_innermost_iteration() -> None:
    run = await run_doc(doc({
        "outer": {"type": "loop", "iterator": "[[1, 2], [], [3]]", "iterator_variable": "row", "index_variable": "r",
                  "body_node": "inner", "collect_variable": "sums", "collect_expression": "{{inner_out}}",
                  "next_node": "z"},
        "inner": {"type": "loop", "iterator": "row", "iterator_variable": "cell", "index_variable": "c",
                  "body_node": "work", "collect_variable": "inner_out",
                  "collect_expression": "{{seen}}"},
        "work": {"type": "sequence", "steps": [
            setv("s", "seen", {"r": "{{r}}", "c": "{{c}}", "li": "{{loop_index}}", "item": "{{loop_item}}"})]},
        "z": {"type": "terminate", "outputs": {"sums": "{{sums}}"}}}, start="outer"))
    assert outputs(run)["sums"] == [
        [{"r": 0, "c": 0, "li": 0, "item": 1}, {"r": 0, "c": 1, "li": 1, "item": 2}],
        [],
        [{"r": 2, "c": 0, "li": 0, "item": 3}]]


async def test_inner_loop_failure_with_outer_continue_on_error() -> None:
    run = await run_doc(doc({
        "outer": {"type": "loop", "iterator": "[[1], [0], [2]]", "iterator_variable": "row",
                  "body_node": "inner", "collect_variable": "ok", "errors_variable": "bad",
                  "continue_on_error": True, "next_node": "z"},
        "inner": {"type": "loop", "iterator": "row", "iterator_variable": "n", "body_node": "work"},
        "work": {"type": "sequence", "steps": [calc("c", "1 / n")]},
        "z": {"type": "terminate", "outputs": {"ok": "{{ok}}", "bad": "{{bad}}"}}}, start="outer"))
    out = outputs(run)
    assert out["ok"] == [[1], [2]]
    [bad] = out["bad"]
    assert bad["iteration"] == 1
    assert bad["error"]["code"] == "loop_iteration_failed"
    assert bad["error"]["cause"]["code"] == "expression_error"


async def test_terminate_inside_a_loop_body_ends_the_run() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2, 3]", "iterator_variable": "n", "body_node": "chk",
                 "next_node": "after"},
        "chk": {"type": "logic", "rules": [{"condition": "n == 2", "next_node": "stop"}], "default_next_node": "w"},
        "w": {"type": "sequence", "steps": [setv("s", "last", "{{n}}")]},
        "stop": {"type": "terminate", "outputs": {"at": "{{n}}", "last": "{{last}}"}},
        "after": {"type": "terminate", "outputs": {"at": "after"}}}, start="each"))
    assert outputs(run) == {"at": 2, "last": 1}
    assert run.of("loop_completed") == []


async def test_loop_failure_gets_node_scope_handlers() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 0]", "iterator_variable": "n", "body_node": "body",
                 "next_node": "z", "error_handlers": [{"action": "ignore"}]},
        "body": {"type": "sequence", "steps": [calc("c", "1 / n")]},
        "z": {"type": "terminate", "outputs": {"ok": True}}}, start="each"))
    assert outputs(run) == {"ok": True}
