"""The CKP node types (ckp.md §3.2–§3.15), run in-process through the interpreter."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_harness import Run, doc, run_doc

pytestmark = pytest.mark.unit

END = {"type": "terminate"}


def setv(step_id: str, variable: str, value: Any) -> dict[str, Any]:
    return {"step_id": step_id, "action": "set_variable", "variable": variable, "value": value}


def calc(step_id: str, expression: str, out: str | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"step_id": step_id, "action": "calculate", "expression": expression}
    if out:
        step["output_variable"] = out
    return step


def outputs(run: Run) -> dict[str, Any]:
    assert run.outcome is not None, run.final
    assert run.outcome["status"] == "completed", run.outcome
    result: dict[str, Any] = run.outcome["outputs"]
    return result


def error(run: Run) -> dict[str, Any]:
    assert run.outcome is not None, run.final
    assert run.outcome["status"] == "failed", run.outcome
    result: dict[str, Any] = run.outcome["error"]
    return result


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


# --- §3.8 parallel ---------------------------------------------------------------------------------------


def fan(**extra: Any) -> dict[str, Any]:
    return {"type": "parallel", "next_node": "join", **extra,
            "branches": [{"branch_id": "b1", "start_node": "one"}, {"branch_id": "b2", "start_node": "two"},
                         {"branch_id": "b3", "start_node": "three"}]}


JOIN = {"type": "terminate", "outputs": {"a": "{{a}}", "b": "{{b}}", "c": "{{c}}", "results": "{{parallel_results}}"}}


async def test_parallel_continue_keeps_completed_branches_and_drops_failed_writes() -> None:
    run = await run_doc(doc({
        "fan": fan(),
        "one": {"type": "sequence", "next_node": "join", "steps": [setv("s", "a", 1)]},
        "two": {"type": "sequence", "next_node": "join", "steps": [setv("s", "b", 2), calc("c", "1 / 0")]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    out = outputs(run)
    assert (out["a"], out["b"], out["c"]) == (1, None, 3)
    branches = out["results"]["branches"]
    assert branches["b1"] == {"status": "completed", "error": None}
    assert branches["b2"]["status"] == "failed"
    assert branches["b2"]["error"]["code"] == "expression_error"
    assert out["results"]["winner"] is None
    [done] = run.of("parallel_completed")
    assert (done.succeeded, done.failed, done.canceled) == (2, 1, 0)
    statuses = {e.branch_id: e.status for e in run.of("parallel_branch_completed")}
    assert statuses == {"b1": "completed", "b2": "failed", "b3": "completed"}


async def test_parallel_every_branch_failing_is_parallel_all_failed() -> None:
    failing = {"type": "sequence", "steps": [calc("c", "1 / 0")]}
    run = await run_doc(doc({"fan": fan(), "one": failing, "two": failing, "three": failing, "join": JOIN},
                            start="fan"))
    assert error(run)["code"] == "parallel_all_failed"


@pytest.mark.parametrize("mode", ["fail", "stop"])
async def test_parallel_branch_failure_fail_cancels_the_rest(mode: str) -> None:
    run = await run_doc(doc({
        "fan": fan(branch_failure=mode, max_concurrency=1),
        "one": {"type": "sequence", "steps": [calc("c", "1 / 0")]},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    err = error(run)
    assert err["code"] == "parallel_branch_failed"
    assert err["details"] == {"branch_id": "b1"}
    assert err["cause"]["code"] == "expression_error"
    assert run.of("step_started")[-1].frame == "fan/b1"


async def test_parallel_any_skips_a_failed_branch_and_takes_the_first_completed() -> None:
    run = await run_doc(doc({
        "fan": fan(wait_strategy="any", max_concurrency=1),
        "one": {"type": "sequence", "steps": [setv("s", "a", 1), calc("c", "1 / 0")]},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    out = outputs(run)
    assert out["results"]["winner"] == "b2"
    assert run.of("parallel_started")[0].wait_strategy == "any"
    assert (out["a"], out["b"], out["c"]) == (None, 2, None)
    assert out["results"]["branches"]["b3"]["status"] == "canceled"
    [done] = run.of("parallel_completed")
    assert (done.succeeded, done.failed, done.canceled) == (1, 1, 1)


async def test_parallel_branches_run_on_private_copies_and_deltas_use_deep_equality() -> None:
    run = await run_doc(doc({
        "init": {"type": "sequence", "next_node": "fan", "steps": [
            setv("s", "cfg", {"k": [1, 2]}), setv("t", "a", 0), setv("u", "gone", 1)]},
        "fan": fan(max_concurrency=1),
        "one": {"type": "sequence", "steps": [setv("s", "a", 1), setv("t", "cfg", {"k": [1, 2]})]},
        # b2 does not see b1's write of a
        "two": {"type": "sequence", "steps": [setv("s", "b", "{{a}}"), setv("t", "cfg", {"k": [1, 2]})]},
        "three": {"type": "sequence", "steps": [setv("s", "c", "{{a}}")]},
        "join": {"type": "terminate", "outputs": {"a": "{{a}}", "b": "{{b}}", "c": "{{c}}", "cfg": "{{cfg}}",
                                                  "gone": "{{gone}}"}}}, start="init"))
    assert outputs(run) == {"a": 1, "b": 0, "c": 0, "cfg": {"k": [1, 2]}, "gone": 1}
    assert run.of("parallel_merge_conflict") == []


async def test_parallel_three_way_conflict_lists_every_branch_and_last_wins() -> None:
    run = await run_doc(doc({
        "fan": fan(),
        "one": {"type": "sequence", "steps": [setv("s", "a", 1)]},
        "two": {"type": "sequence", "steps": [setv("s", "a", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "a", 3)]},
        "join": JOIN}, start="fan"))
    assert outputs(run)["a"] == 3
    conflicts = run.of("parallel_merge_conflict")
    assert [c.variable for c in conflicts] == ["a"]
    assert conflicts[0].branches == ["b1", "b2", "b3"]


async def test_terminate_in_a_branch_ends_the_run_with_its_status() -> None:
    run = await run_doc(doc({
        "fan": fan(max_concurrency=1),
        "one": {"type": "terminate", "status": "failure", "outputs": {"from": "b1"}},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["outputs"] == {"from": "b1"}
    assert run.of("parallel_completed") == []
    assert "join" not in [e.node_id for e in run.of("node_started")]


async def test_branch_path_stops_at_the_join() -> None:
    run = await run_doc(doc({
        "fan": fan(),
        "one": {"type": "sequence", "next_node": "join", "steps": [setv("s", "a", 1)]},
        "two": {"type": "sequence", "next_node": "join", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "next_node": "join", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    assert outputs(run)["a"] == 1
    assert [e.frame for e in run.of("node_started") if e.node_id == "join"] == ["-"]


# --- §3.6 logic ------------------------------------------------------------------------------------------


async def test_logic_first_true_rule_wins_and_default_applies() -> None:
    nodes = {
        "r": {"type": "logic", "default_next_node": "d", "rules": [
            {"condition": "n > 10", "next_node": "big"}, {"condition": "n > 5", "next_node": "mid"},
            {"condition": "run_id == 'run-1'", "next_node": "builtin"}]},
        "big": {"type": "terminate", "outputs": {"r": "big"}}, "mid": {"type": "terminate", "outputs": {"r": "mid"}},
        "builtin": {"type": "terminate", "outputs": {"r": "builtin"}},
        "d": {"type": "terminate", "outputs": {"r": "d"}}}
    schema = {"n": {"type": "number", "required": True}}
    assert outputs(await run_doc(doc(nodes, start="r", variables_schema=schema), {"n": 20}))["r"] == "big"
    assert outputs(await run_doc(doc(nodes, start="r", variables_schema=schema), {"n": 6}))["r"] == "mid"
    assert outputs(await run_doc(doc(nodes, start="r", variables_schema=schema), {"n": 1}))["r"] == "builtin"
    assert outputs(await run_doc(doc(nodes, start="r", variables_schema=schema), {"n": 1},
                                 run_id="other"))["r"] == "d"


async def test_logic_without_default_and_no_match_is_logic_no_route() -> None:
    run = await run_doc(doc({"r": {"type": "logic", "rules": [{"condition": "false", "next_node": "z"}]},
                             "z": END}, start="r"))
    assert error(run)["code"] == "logic_no_route"


async def test_logic_type_error_is_an_expression_error_not_a_false_rule() -> None:
    run = await run_doc(doc({"r": {"type": "logic", "default_next_node": "z", "rules": [
        {"condition": "name > 3", "next_node": "z"}]}, "z": {"type": "terminate", "outputs": {"r": "d"}}},
        start="r", variables_schema={"name": {"type": "string", "default": "abc"}}))
    assert error(run)["code"] == "expression_error"


async def test_logic_no_route_error_goes_to_node_handlers_fallback() -> None:
    run = await run_doc(doc({
        "r": {"type": "logic", "rules": [{"condition": "false", "next_node": "z"}],
              "error_handlers": [{"action": "ignore", "fallback_node": "fb"}]},
        "fb": {"type": "terminate", "outputs": {"code": "{{error.code}}"}},
        "z": END}, start="r"))
    assert outputs(run) == {"code": "logic_no_route"}


# --- §3.10 processing ------------------------------------------------------------------------------------


async def test_processing_renders_each_operation_after_earlier_writes() -> None:
    run = await run_doc(doc({
        "p": {"type": "processing", "next_node": "z", "operations": [
            {"action": "set_variable", "variable": "a", "value": 2},
            {"action": "set_variable", "variable": "b", "value": "{{a}}"},
            {"action": "calculate", "expression": "a + b", "output_variable": "c"},
            {"action": "append_to_array", "array": "lst", "value": "{{c}}"},
            {"action": "append_to_array", "array": "lst", "value": "{{b}}"},
            {"action": "format_string", "template": "{{a}}-{{lst}}", "output_variable": "s"},
            {"action": "parse_json", "source": "```json\n{\"x\": [1]}\n```", "output_variable": "j"},
            {"action": "parse_csv", "source": "k,v\na,1\nb,2\n", "infer_types": True, "output_variable": "csv"},
            {"action": "parse_xml", "source": "<r><i>1</i><i>2</i></r>", "output_variable": "xml"},
            {"action": "extract_regex", "source": "id=42;id=7", "pattern": "id=(\\d+)", "all": True,
             "output_variable": "ids"},
            {"action": "convert_type", "value": "12", "target_type": "integer", "output_variable": "n"},
            {"action": "hash", "value": "abc", "output_variable": "h"},
            {"action": "validate_schema", "value": {"x": 1}, "schema": {"type": "object", "required": ["y"]},
             "on_invalid": "report", "output_variable": "vs"},
            {"action": "generate_id", "prefix": "o-", "format": "short", "output_variable": "gid"},
            {"action": "log", "message": "{{s}}"}]},
        "z": {"type": "terminate", "outputs": {k: "{{" + k + "}}" for k in
                                               ["b", "c", "lst", "s", "j", "csv", "xml", "ids", "n", "h", "gid"]}
              | {"valid": "{{vs.valid}}"}}}, start="p"))
    out = outputs(run)
    assert (out["b"], out["c"], out["lst"]) == (2, 4, [4, 2])
    assert out["s"] == "2-[4,2]"
    assert out["j"] == {"x": [1]}
    assert out["csv"] == [{"k": "a", "v": 1}, {"k": "b", "v": 2}]
    assert out["xml"] == {"r": {"i": ["1", "2"]}}
    assert out["ids"] == ["42", "7"]
    assert out["n"] == 12
    assert out["h"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert out["valid"] is False
    assert out["gid"].startswith("o-")
    assert len(out["gid"]) == 14
    assert [e.message for e in run.of("log")] == [out["s"]]


async def test_processing_failure_names_index_and_action_and_stops() -> None:
    run = await run_doc(doc({
        "p": {"type": "processing", "next_node": "z", "operations": [
            {"action": "set_variable", "variable": "a", "value": 1},
            {"action": "parse_json", "source": "{nope"},
            {"action": "set_variable", "variable": "never", "value": 1}],
            "error_handlers": [{"action": "ignore", "fallback_node": "fb"}]},
        "fb": {"type": "terminate", "outputs": {"code": "{{error.code}}", "details": "{{error.details}}",
                                                "a": "{{a}}", "never": "{{never}}"}},
        "z": END}, start="p"))
    out = outputs(run)
    assert out["code"] == "operation_failed"
    assert out["details"]["index"] == 1
    assert out["details"]["action"] == "parse_json"
    assert out["details"]["reason"] == "invalid_json"
    assert (out["a"], out["never"]) == (1, None)


# --- §3.11 verification ----------------------------------------------------------------------------------


async def test_verification_warn_continue_and_fail_workflow_stops_later_checks() -> None:
    run = await run_doc(doc({
        "v": {"type": "verification", "next_node": "z", "checks": [
            {"id": "ok", "condition": "n == 1", "on_fail": "warn", "message": "never"},
            {"id": "w", "condition": "n > 5", "on_fail": "warn", "message": "small n"},
            {"id": "c", "condition": "n > 5", "on_fail": "continue", "message": "quiet"},
            {"id": "f", "condition": "n > 5", "message": "hard"},
            {"id": "w2", "condition": "false", "on_fail": "warn", "message": "after the failure"}]},
        "z": END}, start="v", variables_schema={"n": {"type": "integer", "default": 1}}))
    err = error(run)
    assert err["code"] == "verification_failed"
    assert err["message"] == "hard"
    assert err["details"]["check_id"] == "f"
    assert [(e.check_id, e.message) for e in run.of("verification_warning")] == [("w", "small n")]


async def test_verification_warn_only_completes_the_node() -> None:
    run = await run_doc(doc({
        "v": {"type": "verification", "next_node": "z", "checks": [
            {"id": "w", "condition": "false", "on_fail": "warn", "message": "m"},
            {"id": "c", "condition": "false", "on_fail": "continue", "message": "m"}]},
        "z": {"type": "terminate", "outputs": {"done": True}}}, start="v"))
    assert outputs(run) == {"done": True}
    assert len(run.of("verification_warning")) == 1


async def test_verification_expression_error_ignores_on_fail_and_is_a_node_scope_error() -> None:
    nodes: dict[str, Any] = {
        "v": {"type": "verification", "next_node": "z", "checks": [
            {"id": "bad", "condition": "name > 3", "on_fail": "continue", "message": "m"}]},
        "z": {"type": "terminate", "outputs": {"done": True}}}
    schema = {"name": {"type": "string", "default": "abc"}}
    assert error(await run_doc(doc(nodes, start="v", variables_schema=schema)))["code"] == "expression_error"
    nodes["v"]["error_handlers"] = [{"action": "ignore"}]
    assert outputs(await run_doc(doc(nodes, start="v", variables_schema=schema))) == {"done": True}


async def test_verification_failure_bypasses_node_handlers_but_reaches_loop_and_recovery() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2, 3]", "iterator_variable": "n", "body_node": "v",
                 "collect_variable": "ok", "errors_variable": "bad", "continue_on_error": True, "next_node": "v2"},
        "v": {"type": "verification", "error_handlers": [{"action": "ignore"}],
              "checks": [{"id": "odd", "condition": "n % 2 == 1", "message": "even"}]},
        "v2": {"type": "verification", "next_node": "z", "error_handlers": [{"action": "ignore"}],
               "checks": [{"id": "none", "condition": "len(bad) == 0", "message": "some failed"}]},
        "z": END,
        "rescue": {"type": "terminate", "outputs": {"ok": "{{ok}}", "code": "{{error.code}}",
                                                    "check": "{{error.details.check_id}}"}}},
        start="each", global_config={"on_failure": "rescue"}))
    assert outputs(run) == {"ok": [1, 3], "code": "verification_failed", "check": "none"}
    assert run.outcome is not None
    assert run.outcome["recovered_via"] == "rescue"


# --- §3.14 transform -------------------------------------------------------------------------------------


async def test_transform_node_chains_every_type() -> None:
    rows = [{"id": 1, "region": "eu", "q": "a", "amount": 5, "tags": ["x"]},
            {"id": 2, "region": "us", "q": "a", "amount": 7, "tags": ["y"]},
            {"id": 3, "region": "eu", "q": "b", "amount": None, "tags": ["x"]},
            {"id": 1, "region": "eu", "q": "a", "amount": 5, "tags": ["x"]}]
    t = [
        {"type": "unique", "source_variable": "rows", "output_variable": "uniq"},
        {"type": "deduplicate", "source_variable": "rows", "params": {"key": "region"}, "output_variable": "regions"},
        {"type": "filter", "source_variable": "uniq", "expression": "amount != null and amount > min_amount",
         "output_variable": "big"},
        {"type": "map", "source_variable": "uniq", "expression": "id * 10 + index", "output_variable": "ids"},
        {"type": "reduce", "source_variable": "uniq", "expression": "acc + if(amount == null, 0, amount)",
         "params": {"initial": "{{start}}"}, "output_variable": "total"},
        {"type": "join", "source_variable": "uniq", "expression": "region", "params": {"separator": "|"},
         "output_variable": "joined"},
        {"type": "join", "source_variable": "nothing", "output_variable": "empty_join"},
        {"type": "aggregate", "source_variable": "uniq", "expression": "count, count(amount), sum(amount) as s, "
         "avg(amount), min(amount), max(amount)", "output_variable": "agg"},
        {"type": "aggregate", "source_variable": "uniq", "expression": "count, sum(amount)",
         "params": {"group_by": "region"}, "output_variable": "by_region"},
        {"type": "pivot", "source_variable": "uniq",
         "params": {"index": "region", "columns": "q", "values": "amount", "aggregate": "sum"},
         "output_variable": "pv"},
        {"type": "sort", "source_variable": "uniq", "params": {"key": "amount", "descending": True},
         "output_variable": "sorted"},
        {"type": "aggregate", "source_variable": "nothing", "expression": "count, sum(amount), avg(amount)",
         "output_variable": "agg_empty"},
    ]
    names = [x["output_variable"] for x in t]
    run = await run_doc(doc({
        "t": {"type": "transform", "next_node": "z", "transformations": t},
        "z": {"type": "terminate", "outputs": {n: "{{" + n + "}}" for n in names}}}, start="t",
        variables_schema={"rows": {"type": "array", "default": rows}, "min_amount": {"type": "number", "default": 5},
                          "start": {"type": "number", "default": 100}}))
    out = outputs(run)
    assert [r["id"] for r in out["uniq"]] == [1, 2, 3]
    assert [r["id"] for r in out["regions"]] == [1, 2]
    assert [r["id"] for r in out["big"]] == [2]
    assert out["ids"] == [10, 21, 32]
    assert out["total"] == 112
    assert out["joined"] == "eu|us|eu"
    assert out["empty_join"] == ""
    assert out["agg"] == {"count": 3, "count_amount": 2, "s": 12, "avg_amount": 6, "min_amount": 5, "max_amount": 7}
    assert out["by_region"] == [{"region": "eu", "count": 2, "sum_amount": 5}, {"region": "us", "count": 1,
                                                                               "sum_amount": 7}]
    assert out["pv"] == [{"region": "eu", "a": 5, "b": 0}, {"region": "us", "a": 7}]
    assert [r["id"] for r in out["sorted"]] == [2, 1, 3]
    assert out["agg_empty"] == {"count": 0, "sum_amount": 0, "avg_amount": None}


async def test_transform_non_list_source_fails_and_later_transformations_do_not_run() -> None:
    run = await run_doc(doc({
        "t": {"type": "transform", "next_node": "z", "error_handlers": [{"action": "ignore", "fallback_node": "fb"}],
              "transformations": [
                  {"type": "map", "source_variable": "rows", "expression": "item", "output_variable": "first"},
                  {"type": "map", "source_variable": "cfg", "expression": "item", "output_variable": "second"},
                  {"type": "map", "source_variable": "rows", "expression": "item", "output_variable": "third"}]},
        "fb": {"type": "terminate", "outputs": {"code": "{{error.code}}", "reason": "{{error.details.reason}}",
                                                "first": "{{first}}", "third": "{{third}}"}},
        "z": END}, start="t",
        variables_schema={"rows": {"type": "array", "default": [1]}, "cfg": {"type": "object", "default": {"a": 1}}}))
    assert outputs(run) == {"code": "operation_failed", "reason": "source_not_a_list", "first": [1], "third": None}


# --- §3.15 terminate -------------------------------------------------------------------------------------


async def test_terminate_outputs_literals_typed_values_and_cleanup_writes() -> None:
    run = await run_doc(doc({
        "a": {"type": "terminate",
              "outputs": {"lit": "plain text", "n": "{{n}}", "emb": "n={{n}}", "obj": {"k": ["{{n}}"]},
                          "cleaned": "{{cleaned}}"},
              "cleanup_actions": [{"action": "set_variable", "variable": "cleaned", "value": True}],
              "error_actions": [{"action": "log", "message": "must not run"}],
              "final_audit_log": {"n": "{{n}}", "note": "done"}}}, variables_schema={"n": {"type": "integer",
                                                                                         "default": 3}}))
    assert outputs(run) == {"lit": "plain text", "n": 3, "emb": "n=3", "obj": {"k": [3]}, "cleaned": True}
    assert run.of("log") == []
    [audit] = run.of("audit_log")
    assert audit.entry == {"n": 3, "note": "done"}


async def test_terminate_failing_cleanup_action_is_reported_and_does_not_change_the_outcome() -> None:
    run = await run_doc(doc({
        "a": {"type": "terminate", "status": "failure", "outputs": {"why": "x"},
              "cleanup_actions": [{"action": "parse_json", "source": "{bad"}, {"action": "log", "message": "c1"}],
              "error_actions": [{"action": "calculate", "expression": "1 / 0"}, {"action": "log", "message": "e1"}]}}))
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["error"]["code"] == "terminated_failed"
    assert run.outcome["outputs"] == {"why": "x"}
    assert [e.step_id for e in run.of("step_failed")] == ["cleanup[0]", "error_actions[0]"]
    assert [e.message for e in run.of("log")] == ["c1", "e1"]


async def test_terminate_on_a_recovery_path_runs_error_actions_even_on_success() -> None:
    run = await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [calc("c", "1 / 0")]},
        "z": END,
        "rescue": {"type": "terminate", "outputs": {"ok": True},
                   "error_actions": [{"action": "log", "message": "recovering from {{error.code}}"}]}},
        global_config={"on_failure": "rescue"}))
    assert outputs(run) == {"ok": True}
    assert [e.message for e in run.of("log")] == ["recovering from expression_error"]


async def test_terminate_inside_a_branch_inside_a_loop_cancels_the_loop() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2, 3]", "iterator_variable": "n", "body_node": "fan",
                 "next_node": "after"},
        "fan": {"type": "parallel", "branches": [{"branch_id": "l", "start_node": "chk"},
                                                 {"branch_id": "r", "start_node": "w"}]},
        "chk": {"type": "logic", "rules": [{"condition": "n == 2", "next_node": "stop"}]},
        "w": {"type": "sequence", "steps": [{"step_id": "l", "action": "log", "message": "{{n}}"}]},
        "stop": {"type": "terminate", "status": "success", "outputs": {"at": "{{n}}"}},
        "after": {"type": "terminate", "outputs": {"at": "after"}}}, start="each"))
    # iteration 0: branch l fails (logic_no_route) and branch_failure continue keeps the node going
    assert outputs(run) == {"at": 2}
    assert len(run.of("loop_iteration")) == 2
    assert run.of("loop_completed") == []
    assert [e.message for e in run.of("log")][:1] == ["1"]


# --- §3.3 error resolution -------------------------------------------------------------------------------


def flaky_processing(**extra: Any) -> dict[str, Any]:
    return {"type": "processing", "next_node": "z", **extra, "operations": [
        {"action": "append_to_array", "array": "visits", "value": 1},
        {"action": "calculate", "expression": "1 / (len(visits) - 1) / (len(visits) - 2)"}]}


async def test_node_scope_retry_reruns_the_node_until_it_succeeds() -> None:
    run = await run_doc(doc({
        "a": flaky_processing(error_handlers=[{"action": "retry", "max_retries": 3, "delay_ms": 0}]),
        "z": {"type": "terminate", "outputs": {"visits": "{{len(visits)}}"}}}))
    assert outputs(run) == {"visits": 3}
    assert [e.node_id for e in run.of("node_started")] == ["a", "a", "a", "z"]


async def test_node_scope_retry_exhausted_fails_with_the_error() -> None:
    run = await run_doc(doc({
        "a": {"type": "processing", "next_node": "z",
              "error_handlers": [{"action": "retry", "max_retries": 2, "delay_ms": 0}],
              "operations": [{"action": "append_to_array", "array": "visits", "value": 1},
                             {"action": "calculate", "expression": "1 / 0"}]},
        "z": END}))
    assert error(run)["code"] == "expression_error"
    assert len([e for e in run.of("node_started") if e.node_id == "a"]) == 3


async def test_unresolved_step_error_is_not_offered_again_at_node_scope() -> None:
    run = await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z",
              "error_handlers": [{"action": "retry", "max_retries": 1, "delay_ms": 0}],
              "steps": [calc("c", "1 / 0")]},
        "z": END}))
    assert error(run)["code"] == "expression_error"
    assert len(run.of("step_started")) == 2
    assert len(run.of("node_started")) == 1


async def test_fallback_sets_error_for_the_rest_of_the_frame_and_it_is_cleared_when_the_frame_ends() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[0, 1]", "iterator_variable": "n", "body_node": "p",
                 "collect_variable": "seen", "collect_expression": "{{in_fb}}", "next_node": "z"},
        "p": {"type": "processing", "error_handlers": [{"action": "ignore", "fallback_node": "fb"}],
              "next_node": "ok", "operations": [{"action": "calculate", "expression": "1 / n"}]},
        "fb": {"type": "sequence", "steps": [setv("s", "in_fb", "{{error.code}}")]},
        "ok": {"type": "sequence", "steps": [setv("s", "in_fb", "{{error}}")]},
        "z": {"type": "terminate", "outputs": {"seen": "{{seen}}", "in_fb": "{{in_fb}}", "after": "{{error}}"}}},
        start="each"))
    # iteration 0 routes to fb with error set; iteration 1 (a new frame) reaches ok with error cleared
    assert outputs(run) == {"seen": ["expression_error", None], "in_fb": None, "after": None}


async def test_recovery_path_failure_keeps_the_original_error_and_reports_the_recovery_error() -> None:
    run = await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [calc("c", "1 / 0")]},
        "z": END,
        "rescue": {"type": "processing", "operations": [{"action": "parse_json", "source": "{x"}]}},
        global_config={"on_failure": "rescue"}))
    err = error(run)
    assert err["code"] == "expression_error"
    assert run.outcome is not None
    assert run.outcome["recovery_error"]["code"] == "operation_failed"


async def test_recovery_terminate_failed_fails_the_run_with_recovered_via() -> None:
    run = await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [calc("c", "1 / 0")]},
        "z": END,
        "rescue": {"type": "terminate", "status": "failed", "outputs": {"why": "{{error.code}}"}}},
        global_config={"on_failure": "rescue"}))
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["recovered_via"] == "rescue"
    assert run.outcome["outputs"] == {"why": "expression_error"}


async def test_recovery_path_normal_end_completes_as_recovered_with_empty_outputs() -> None:
    run = await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [calc("c", "1 / 0")]},
        "z": END,
        "rescue": {"type": "sequence", "steps": [{"step_id": "l", "action": "log", "message": "{{error.code}}"}]}},
        global_config={"on_failure": "rescue"}))
    assert run.outcome == {"status": "completed", "outputs": {}, "recovered_via": "rescue"}
    assert [e.message for e in run.of("log")] == ["expression_error"]


# --- §3.2 frames and pauses ------------------------------------------------------------------------------


async def test_each_iteration_frame_keeps_its_own_hop_count() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2, 3, 4, 5, 6]", "iterator_variable": "n", "body_node": "b1",
                 "collect_variable": "got", "next_node": "z"},
        "b1": {"type": "sequence", "next_node": "b2", "steps": []},
        "b2": {"type": "sequence", "next_node": "b3", "steps": []},
        "b3": {"type": "sequence", "steps": []},
        "z": {"type": "terminate", "outputs": {"got": "{{len(got)}}"}}}, start="each",
        global_config={"max_hops": 4}))
    # 18 body hops in total, 3 per iteration frame; the main frame makes 2 hops
    assert outputs(run) == {"got": 6}


async def test_max_hops_inside_an_iteration_fails_that_iteration() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2]", "iterator_variable": "n", "body_node": "a",
                 "continue_on_error": True, "errors_variable": "bad", "next_node": "z"},
        "a": {"type": "sequence", "next_node": "b", "steps": []},
        "b": {"type": "logic", "rules": [{"condition": "n == 2", "next_node": "a"}], "default_next_node": "c"},
        "c": {"type": "sequence", "steps": []},
        "z": {"type": "terminate", "outputs": {"bad": "{{bad}}"}}}, start="each", global_config={"max_hops": 5}))
    [bad] = outputs(run)["bad"]
    assert bad["iteration"] == 1
    assert bad["error"]["code"] == "max_hops_exceeded"


APPROVE = {"type": "human_approval", "prompt": "ok {{loop_index}}?", "on_approve": "mark", "on_reject": "mark"}


async def test_approval_inside_a_loop_resumes_the_same_iteration() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "['a', 'b']", "iterator_variable": "x", "index_variable": "i",
                 "body_node": "ask", "collect_variable": "got", "collect_expression": "{{x}}={{approval.ask.decision}}",
                 "next_node": "z"},
        "ask": APPROVE,
        "mark": {"type": "sequence", "steps": [setv("s", "marked", "{{x}}")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "x": "{{x}}", "i": "{{i}}"}}}, start="each"))
    assert run.outcome is None
    [wait] = run.waits
    assert wait["frame"] == "each[0]"
    await run.resume(wait_id=wait["id"], decision="approved", status="approved")
    assert run.outcome is None
    [wait] = run.waits
    assert wait["frame"] == "each[1]"
    await run.resume(wait_id=wait["id"], decision="rejected", status="rejected")
    assert outputs(run) == {"got": ["a=approved", "b=rejected"], "x": "b", "i": 1}
    assert [e.prompt for e in run.of("approval_requested")] == ["ok 0?", "ok 1?"]


async def test_parallel_any_cancels_a_paused_branch_and_drops_its_wait() -> None:
    run = await run_doc(doc({
        "fan": {"type": "parallel", "wait_strategy": "any", "next_node": "z",
                "branches": [{"branch_id": "slow", "start_node": "ask"}, {"branch_id": "fast", "start_node": "w"}]},
        "ask": APPROVE,
        "mark": {"type": "sequence", "steps": [setv("s", "marked", True)]},
        "w": {"type": "sequence", "steps": [setv("s", "fast", True)]},
        "z": {"type": "terminate", "outputs": {"fast": "{{fast}}", "marked": "{{marked}}",
                                               "winner": "{{parallel_results.winner}}",
                                               "slow": "{{parallel_results.branches.slow.status}}"}}}, start="fan"))
    assert outputs(run) == {"fast": True, "marked": None, "winner": "fast", "slow": "canceled"}
    assert run.waits == []


async def test_parallel_all_waits_for_a_paused_branch_then_merges_its_writes() -> None:
    run = await run_doc(doc({
        "fan": {"type": "parallel", "next_node": "z",
                "branches": [{"branch_id": "slow", "start_node": "ask"}, {"branch_id": "fast", "start_node": "w"}]},
        "ask": APPROVE,
        "mark": {"type": "sequence", "steps": [setv("s", "marked", True)]},
        "w": {"type": "sequence", "steps": [setv("s", "fast", True)]},
        "z": {"type": "terminate", "outputs": {"fast": "{{fast}}", "marked": "{{marked}}",
                                               "decision": "{{approval.ask.decision}}"}}}, start="fan"))
    assert run.outcome is None
    assert len(run.of("parallel_branch_completed")) == 1
    await run.resume(wait_id=run.waits[0]["id"], decision="approved", status="approved")
    assert outputs(run) == {"fast": True, "marked": True, "decision": "approved"}


async def test_parallel_fail_mode_cancels_a_paused_branch() -> None:
    run = await run_doc(doc({
        "fan": {"type": "parallel", "branch_failure": "fail", "next_node": "z",
                "branches": [{"branch_id": "slow", "start_node": "ask"}, {"branch_id": "bad", "start_node": "w"}]},
        "ask": APPROVE,
        "mark": {"type": "sequence", "steps": []},
        "w": {"type": "sequence", "steps": [calc("c", "1 / 0")]},
        "z": END}, start="fan"))
    err = error(run)
    assert err["code"] == "parallel_branch_failed"
    assert err["details"] == {"branch_id": "bad"}
    assert run.waits == []


async def test_parallel_inside_a_loop_merges_into_the_iteration() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2]", "iterator_variable": "n", "body_node": "fan",
                 "collect_variable": "got", "collect_expression": "{{l + r}}", "next_node": "z"},
        "fan": {"type": "parallel", "branches": [{"branch_id": "l", "start_node": "lw"},
                                                 {"branch_id": "r", "start_node": "rw"}]},
        "lw": {"type": "sequence", "steps": [calc("c", "n * 10", "l")]},
        "rw": {"type": "sequence", "steps": [calc("c", "n", "r")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}"}}}, start="each"))
    assert outputs(run) == {"got": [11, 22]}
    assert {e.frame for e in run.of("step_started")} == {"each[0]/fan/l", "each[0]/fan/r", "each[1]/fan/l",
                                                          "each[1]/fan/r"}


async def test_nested_parallel_branch_failure_propagates_to_the_outer_branch() -> None:
    run = await run_doc(doc({
        "outer": {"type": "parallel", "next_node": "z",
                  "branches": [{"branch_id": "o1", "start_node": "inner"}, {"branch_id": "o2", "start_node": "ok"}]},
        "inner": {"type": "parallel", "branch_failure": "fail",
                  "branches": [{"branch_id": "i1", "start_node": "bad"}, {"branch_id": "i2", "start_node": "ok2"}]},
        "bad": {"type": "sequence", "steps": [calc("c", "1 / 0")]},
        "ok2": {"type": "sequence", "steps": [setv("s", "i2", True)]},
        "ok": {"type": "sequence", "steps": [setv("s", "o2", True)]},
        "z": {"type": "terminate", "outputs": {"o2": "{{o2}}", "i2": "{{i2}}",
                                               "o1": "{{parallel_results.branches.o1.error.code}}"}}},
        start="outer"))
    assert outputs(run) == {"o2": True, "i2": None, "o1": "parallel_branch_failed"}


async def test_parallel_merge_compares_json_values_so_a_boolean_replacing_a_number_is_a_delta() -> None:
    run = await run_doc(doc({
        "init": {"type": "sequence", "next_node": "fan", "steps": [
            setv("s", "flag", 1), setv("t", "cfg", {"on": 0}), setv("u", "ratio", 2)]},
        "fan": fan(),
        "one": {"type": "sequence", "steps": [setv("s", "flag", True)]},
        "two": {"type": "sequence", "steps": [setv("s", "cfg", {"on": False})]},
        "three": {"type": "sequence", "steps": [calc("c", "4 / 2", "ratio")]},  # 2.0 equals 2: no delta
        "join": {"type": "terminate", "outputs": {"flag": "{{flag}}", "cfg": "{{cfg}}", "ratio": "{{ratio}}"}}},
        start="init"))
    out = outputs(run)
    assert out["flag"] is True
    assert out["cfg"]["on"] is False
    assert out["ratio"] == 2
    assert run.of("parallel_merge_conflict") == []


async def test_node_scope_retry_budget_is_fresh_on_each_new_entry_of_the_node() -> None:
    # 'work' fails on the first try of every round (odd visit counts) and succeeds on its retry; the cycle enters it
    # twice, so each entry needs its own budget of one retry.
    run = await run_doc(doc({
        "work": {"type": "processing", "next_node": "again",
                 "error_handlers": [{"action": "retry", "max_retries": 1, "delay_ms": 0}],
                 "operations": [{"action": "append_to_array", "array": "tries", "value": 1},
                                {"action": "calculate", "expression": "1 / ((len(tries) + 1) % 2)"}]},
        "again": {"type": "logic", "rules": [{"condition": "len(tries) < 4", "next_node": "work"}],
                  "default_next_node": "z"},
        "z": {"type": "terminate", "outputs": {"tries": "{{len(tries)}}"}}}, start="work"))
    assert outputs(run) == {"tries": 4}


# --- §3.9 subflow (interpreter side; end-to-end runs are in tests/test_subflow_runs.py) -------------


class FakeChildren:
    """Records child-run starts; the parent is resumed by the test as the child-finished command would."""

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.starts: list[dict[str, Any]] = []

    async def start(self, **kwargs: Any) -> str:
        self.starts.append(kwargs)
        return self.version


async def run_with_children(document: dict[str, Any], children: FakeChildren,
                            run_created: dict[str, Any] | None = None,
                            inputs: dict[str, Any] | None = None) -> Run:
    from langgraph.checkpoint.memory import InMemorySaver

    from ckp_core.events import EventData
    from ckp_core.variables import validate_inputs
    from langorch_runtime.executor import build_graph
    from langorch_runtime.machine import Machine, RunInfo
    from langorch_runtime.steps import MemoryStepStore
    from runtime_harness import compile_ok

    ir = compile_ok(document)
    events: list[EventData] = []

    async def emit(event: EventData) -> int:
        events.append(event)
        return len(events)

    async def no_sleep(seconds: float) -> None:
        return None

    values = validate_inputs(ir.variables, inputs or {}, {"run_id": "run-1"})
    created = {"input_vars": values, "root_run_id": "run-1", **(run_created or {})}
    machine = Machine(ir=ir, run=RunInfo(run_id="run-1", run_created=created,
                                         started_at="2026-01-01T00:00:00.000000Z"),
                      emit=emit, steps=MemoryStepStore("run-1"), sleep=no_sleep, children=children)
    graph = build_graph(machine, InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": "run-1"}, "recursion_limit": 100_000}
    run = Run(ir=ir, machine=machine, graph=graph, config=config, events=events)
    run.final = await graph.ainvoke(machine.initial_state(values), config, durability="sync")
    return run


def call(**extra: Any) -> dict[str, Any]:
    return {"type": "subflow", "procedure_id": "child", "next_node": "z", **extra}


async def test_subflow_refuses_a_procedure_already_on_the_call_chain() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({"a": call(), "z": END}), kids, {"call_chain": ["child", "mid", "p"]})
    err = error(run)
    assert err["code"] == "subflow_recursion"
    assert "child -> mid -> p -> child" in err["message"]
    assert kids.starts == []


@pytest.mark.parametrize(("chain_length", "started"), [(9, True), (10, False)])
async def test_subflow_depth_bound_is_ten_runs(chain_length: int, started: bool) -> None:
    kids = FakeChildren()
    chain = [f"p{i}" for i in range(chain_length - 1)] + ["p"]
    run = await run_with_children(doc({"a": call(), "z": END}), kids, {"call_chain": chain})
    if started:
        assert run.outcome is None
        assert kids.starts[0]["call_chain"] == [*chain, "child"]
    else:
        assert error(run)["code"] == "subflow_depth_exceeded"
        assert kids.starts == []


async def test_subflow_inputs_inherit_context_then_mapping_and_bare_paths_keep_types() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(inherit_context=True, input_mapping={"id": "order.id", "label": "n-{{order.id}}", "flag": False,
                                                       "keep": "plain text"}),
        "z": END}, variables_schema={"order": {"type": "object", "default": {"id": 7}},
                                     "flag": {"type": "boolean", "default": True}}), kids)
    assert run.outcome is None
    inputs = kids.starts[0]["inputs"]
    assert inputs == {"order": {"id": 7}, "flag": False, "id": 7, "label": "n-7", "keep": "plain text"}


async def test_subflow_output_mapping_prefers_outputs_then_final_variables_and_warns_when_missing() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(output_mapping={"x": "result.value", "y": "internal", "w": "result.nope", "v": "ghost"}),
        "z": {"type": "terminate", "outputs": {"x": "{{x}}", "y": "{{y}}", "w": "{{w}}", "v": "{{v}}"}}}), kids)
    child_id = kids.starts[0]["child_run_id"]
    await run.resume(wait_id=child_id, status="completed", outputs={"result": {"value": 3}},
                     variables={"result": {"value": "shadowed"}, "internal": [1]})
    assert outputs(run) == {"x": 3, "y": [1], "w": None, "v": None}
    fields = sorted(w.location["field"] for w in run.of("template_warning"))
    assert fields == ["/output_mapping/v", "/output_mapping/w"]


async def test_subflow_with_an_empty_output_mapping_sets_subflow_output() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(), "z": {"type": "terminate", "outputs": {"out": "{{subflow_output}}"}}}), kids)
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="completed", outputs={"k": [1, 2]},
                     variables={"other": 1})
    assert outputs(run) == {"out": {"k": [1, 2]}}


@pytest.mark.parametrize(("on_failure", "max_retries", "children_started", "status"), [
    ("fail_parent", 1, 1, "failed"), ("continue", 1, 1, "completed"), ("retry", 0, 1, "failed"),
    ("retry", 2, 3, "failed")])
async def test_subflow_on_failure_modes(on_failure: str, max_retries: int, children_started: int,
                                        status: str) -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(on_failure=on_failure, max_retries=max_retries, output_mapping={"r": "r"}),
        "z": {"type": "terminate", "outputs": {"r": "{{r}}"}}}), kids)
    while run.outcome is None:
        await run.resume(wait_id=kids.starts[-1]["child_run_id"], status="failed",
                         error={"code": "terminated_failed", "message": "child said no"})
    assert len(kids.starts) == children_started
    assert [s["rerun_of"] for s in kids.starts] == [None] + [s["child_run_id"] for s in kids.starts[:-1]]
    assert run.outcome["status"] == status
    if status == "failed":
        assert run.outcome["error"]["code"] == "subflow_failed"
        assert run.outcome["error"]["cause"]["code"] == "terminated_failed"
    else:
        assert run.outcome["outputs"] == {"r": None}
    assert len(run.of("subflow_failed")) == children_started


async def test_subflow_retry_succeeding_on_the_second_child_maps_its_outputs() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(on_failure="retry", output_mapping={"r": "r"}),
        "z": {"type": "terminate", "outputs": {"r": "{{r}}"}}}), kids)
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="canceled")
    await run.resume(wait_id=kids.starts[1]["child_run_id"], status="completed", outputs={"r": 5})
    assert outputs(run) == {"r": 5}
    assert [e.attempt for e in run.of("subflow_started")] == [1, 2]


async def test_subflows_in_parallel_branches_and_a_dry_run_parent() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "fan": {"type": "parallel", "next_node": "z", "branches": [{"branch_id": "l", "start_node": "cl"},
                                                                   {"branch_id": "r", "start_node": "cr"}]},
        "cl": call(output_mapping={"left": "v"}, next_node=None),
        "cr": call(output_mapping={"right": "v"}, next_node=None),
        "z": {"type": "terminate", "outputs": {"l": "{{left}}", "r": "{{right}}"}}}, start="fan",
        global_config={"execution_mode": "dry_run"}), kids)
    assert len(kids.starts) == 2
    assert all(s["dry_run"] for s in kids.starts)
    assert len(run.waits) == 2
    await run.resume(wait_id=kids.starts[1]["child_run_id"], status="completed", outputs={"v": "R"})
    assert run.outcome is None
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="completed", outputs={"v": "L"})
    assert outputs(run) == {"l": "L", "r": "R"}


async def test_subflow_in_a_loop_starts_one_child_per_iteration() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "each": {"type": "loop", "iterator": "[1, 2]", "iterator_variable": "n", "body_node": "c",
                 "collect_variable": "got", "collect_expression": "{{sub}}", "next_node": "z"},
        "c": call(input_mapping={"n": "{{n}}"}, output_mapping={"sub": "double"}, next_node=None),
        "z": {"type": "terminate", "outputs": {"got": "{{got}}"}}}, start="each"), kids)
    for expected in (1, 2):
        start = kids.starts[-1]
        assert start["inputs"] == {"n": expected}
        await run.resume(wait_id=start["child_run_id"], status="completed", outputs={"double": expected * 2})
    assert outputs(run) == {"got": [2, 4]}
    assert len({s["child_run_id"] for s in kids.starts}) == 2


async def test_a_late_result_of_a_child_whose_branch_was_canceled_is_ignored() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "fan": {"type": "parallel", "wait_strategy": "any", "next_node": "ask",
                "branches": [{"branch_id": "sub", "start_node": "c"}, {"branch_id": "fast", "start_node": "w"}]},
        "c": call(output_mapping={"from_child": "v"}, next_node=None),
        "w": {"type": "sequence", "steps": [setv("s", "fast", True)]},
        "ask": {"type": "human_approval", "on_approve": "z", "on_reject": "z"},
        "z": {"type": "terminate", "outputs": {"fast": "{{fast}}", "from_child": "{{from_child}}",
                                               "winner": "{{parallel_results.winner}}"}}}, start="fan"), kids)
    assert [w["kind"] for w in run.waits] == ["approval"]
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="completed", outputs={"v": "late"})
    assert run.outcome is None
    assert [w["kind"] for w in run.waits] == ["approval"]
    await run.resume(wait_id=run.waits[0]["id"], decision="approved", status="approved")
    assert outputs(run) == {"fast": True, "from_child": None, "winner": "fast"}


# --- §3.4 edges and the static rules of §3.5–§3.15 -----------------------------------------------------------


def diagnostics(nodes: dict[str, Any], start: str = "a", **extra: Any) -> list[tuple[str, str, str]]:
    from ckp_core.compiler import compile_document

    result = compile_document(doc(nodes, start=start, **extra))
    return [(d.severity, d.code, d.path) for d in result.diagnostics]


NODE = "/workflow_graph/nodes"


@pytest.mark.parametrize(("nodes", "expected"), [
    ({"a": {"type": "logic", "default_next_node": "z", "next_node": "z"}, "z": END},
     ("error", "edge_not_allowed", f"{NODE}/a/next_node")),
    ({"a": {"type": "terminate", "next_node": "a"}}, ("error", "edge_not_allowed", f"{NODE}/a/next_node")),
    ({"a": {"type": "human_approval", "on_approve": "z", "on_reject": "z", "next_node": "z"}, "z": END},
     ("error", "edge_not_allowed", f"{NODE}/a/next_node")),
    ({"a": {"type": "sequence", "next_node": "nowhere"}}, ("error", "unknown_target", f"{NODE}/a/next_node")),
    ({"a": {"type": "logic"}}, ("error", "empty_logic", f"{NODE}/a")),
    ({"a": {"type": "logic", "rules": [{"condition": "true", "next_node": "z"}]}, "z": END},
     ("warning", "logic_without_default", f"{NODE}/a")),
    ({"a": END, "b": END}, ("warning", "unreachable_node", f"{NODE}/b")),
    ({"a": {"type": "terminate", "status": "aborted"}}, ("error", "invalid_value", f"{NODE}/a/status")),
    ({"a": {"type": "parallel", "branch_failure": "retry", "branches": [{"branch_id": "x", "start_node": "z"}]},
      "z": END}, ("error", "invalid_value", f"{NODE}/a/branch_failure")),
    ({"a": {"type": "processing", "operations": [{"action": "teleport"}]}},
     ("error", "unknown_operation", f"{NODE}/a/operations/0/action")),
    ({"a": {"type": "transform", "transformations": [{"type": "explode", "source_variable": "x",
                                                      "output_variable": "y"}]}},
     ("error", "unknown_transform_type", f"{NODE}/a/transformations/0/type")),
    ({"a": {"type": "transform", "transformations": [{"type": "aggregate", "source_variable": "x",
                                                      "expression": "median(v)", "output_variable": "y"}]}},
     ("error", "expression_syntax_error", f"{NODE}/a/transformations/0/expression")),
])
def test_static_rules(nodes: dict[str, Any], expected: tuple[str, str, str]) -> None:
    found = diagnostics(nodes)
    assert expected in found, found


@pytest.mark.parametrize("nodes", [
    # edges through which a node counts as reachable: escalation handler, fallback, on_failure, loop body, branch
    {"a": {"type": "sequence", "next_node": "z", "sla": {"max_duration_ms": 10, "on_breach": "escalate",
                                                         "escalation_handler": "b"}}, "b": END, "z": END},
    {"a": {"type": "sequence", "next_node": "z", "error_handlers": [{"action": "ignore", "fallback_node": "b"}]},
     "b": END, "z": END},
    {"a": {"type": "loop", "iterator": "[]", "iterator_variable": "x", "body_node": "b", "next_node": "z"},
     "b": {"type": "sequence"}, "z": END},
    {"a": {"type": "human_approval", "decision_type": "select_option", "options": ["p", "q"],
           "option_routes": {"p": "b", "q": "z"}}, "b": END, "z": END},
])
def test_every_edge_kind_counts_for_reachability(nodes: dict[str, Any]) -> None:
    assert not [d for d in diagnostics(nodes) if d[1] == "unreachable_node"], diagnostics(nodes)


def test_on_failure_counts_as_an_edge() -> None:
    found = diagnostics({"a": END, "rescue": END}, global_config={"on_failure": "rescue"})
    assert not [d for d in found if d[1] == "unreachable_node"], found


# --- more runtime corners ------------------------------------------------------------------------------------


async def test_iterator_placeholder_and_condition_placeholders() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "{{order.lines}}", "iterator_variable": "line", "body_node": "r",
                 "collect_variable": "got", "collect_expression": "{{tag}}", "next_node": "z"},
        "r": {"type": "logic", "rules": [{"condition": "{{line.qty}} > 1", "next_node": "many"}],
              "default_next_node": "one"},
        "many": {"type": "sequence", "steps": [setv("s", "tag", "many")]},
        "one": {"type": "sequence", "steps": [setv("s", "tag", "one")]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}"}}}, start="each",
        variables_schema={"order": {"type": "object", "default": {"lines": [{"qty": 1}, {"qty": 3}]}}}))
    assert outputs(run) == {"got": ["one", "many"]}


async def test_parallel_max_concurrency_starts_branches_in_declaration_order() -> None:
    run = await run_doc(doc({
        "fan": fan(max_concurrency=2),
        "one": {"type": "sequence", "next_node": "one2", "steps": [setv("s", "a", 1)]},
        "one2": {"type": "sequence", "steps": [setv("s", "a2", 1)]},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    out = outputs(run)
    assert (out["a"], out["b"], out["c"]) == (1, 2, 3)
    firsts: list[str] = []
    for e in run.of("node_started"):
        branch = e.frame.split("/")[-1] if e.frame and "/" in e.frame else None
        if branch and branch not in firsts:
            firsts.append(branch)
    assert firsts == ["b1", "b2", "b3"]
    # b3 starts only once b2 (one node) has finished, while b1 is still on its second node
    started = [(e.node_id, e.frame) for e in run.of("node_started")]
    assert started.index(("three", "fan/b3")) > started.index(("two", "fan/b2"))


async def test_node_scope_retry_of_a_loop_starts_fresh_lists() -> None:
    run = await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2]", "iterator_variable": "n", "body_node": "body",
                 "collect_variable": "got", "next_node": "z",
                 "error_handlers": [{"action": "retry", "max_retries": 1, "delay_ms": 0}]},
        "body": {"type": "processing", "operations": [
            {"action": "append_to_array", "array": "seen", "value": "{{n}}"},
            {"action": "calculate", "expression": "1 / (len(seen) - 2)"}]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "seen": "{{seen}}"}}}, start="each"))
    # first entry: iteration 0 ok (len 1), iteration 1 fails (len 2) -> loop fails -> retry: both iterations pass
    assert outputs(run) == {"got": [1, 2], "seen": [1, 2, 1, 2]}
    assert [e.frame for e in run.of("loop_started")] == ["-", "#2"]


async def test_recovery_path_can_pause_for_an_approval() -> None:
    run = await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [calc("c", "1 / 0")]},
        "z": END,
        "ask": {"type": "human_approval", "prompt": "{{error.code}}", "on_approve": "ok", "on_reject": "no"},
        "ok": {"type": "terminate", "outputs": {"code": "{{error.code}}"}},
        "no": {"type": "terminate", "status": "failed", "outputs": {"code": "{{error.code}}"}}},
        global_config={"on_failure": "ask"}))
    assert run.outcome is None
    [requested] = run.of("approval_requested")
    assert requested.prompt == "expression_error"
    await run.resume(wait_id=run.waits[0]["id"], decision="rejected", status="rejected")
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["recovered_via"] == "ask"
    assert run.outcome["error"]["code"] == "expression_error"
    assert run.outcome["outputs"] == {"code": "expression_error"}


async def test_final_audit_log_is_not_emitted_when_audit_is_disabled() -> None:
    run = await run_doc(doc({"a": {"type": "terminate", "final_audit_log": {"x": 1}}},
                            global_config={"audit_config": {"enabled": False}}))
    assert outputs(run) == {}
    assert run.of("audit_log") == []


async def test_loop_variables_written_inside_a_branch_merge_back() -> None:
    run = await run_doc(doc({
        "fan": {"type": "parallel", "next_node": "z", "branches": [{"branch_id": "l", "start_node": "each"}]},
        "each": {"type": "loop", "iterator": "[5, 6]", "iterator_variable": "x", "index_variable": "i",
                 "body_node": "w", "collect_variable": "got"},
        "w": {"type": "sequence", "steps": []},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}", "x": "{{x}}", "i": "{{i}}"}}}, start="fan"))
    assert outputs(run) == {"got": [5, 6], "x": 6, "i": 1}


@pytest.mark.parametrize(("op", "code", "reason"), [
    ({"action": "calculate", "expression": "1 / 0"}, "expression_error", None),
    ({"action": "convert_type", "value": "x", "target_type": "integer"}, "conversion_failed", None),
    ({"action": "validate_schema", "value": {}, "schema": {"type": "object", "required": ["a"]}},
     "schema_validation_failed", None),
    ({"action": "append_to_array", "array": "scalar", "value": 1}, "operation_failed", "not_a_list"),
])
async def test_a_failing_operation_names_its_index_and_action_whatever_its_code(op: dict[str, Any], code: str,
                                                                                 reason: str | None) -> None:
    run = await run_doc(doc({
        "p": {"type": "processing", "next_node": "z", "operations": [
            {"action": "set_variable", "variable": "scalar", "value": 3}, op]},
        "z": END}, start="p"))
    err = error(run)
    assert err["code"] == code
    assert err["details"]["index"] == 1
    assert err["details"]["action"] == op["action"]
    if reason is not None:
        assert err["details"]["reason"] == reason


async def test_a_fallback_error_in_a_branch_does_not_leak_past_the_join() -> None:
    run = await run_doc(doc({
        "fan": {"type": "parallel", "next_node": "z", "branches": [{"branch_id": "l", "start_node": "p"}]},
        "p": {"type": "processing", "error_handlers": [{"action": "ignore", "fallback_node": "fb"}],
              "operations": [{"action": "calculate", "expression": "1 / 0"}]},
        "fb": {"type": "sequence", "steps": [setv("s", "seen", "{{error.code}}")]},
        "z": {"type": "terminate", "outputs": {"seen": "{{seen}}", "error": "{{error}}",
                                               "index": "{{loop_index}}"}}}, start="fan"))
    assert outputs(run) == {"seen": "expression_error", "error": None, "index": None}


def test_unknown_node_type_is_one_diagnostic_and_skips_reachability() -> None:
    found = diagnostics({"a": {"type": "teleporter", "next_node": "nowhere", "bogus": 1}, "b": END})
    assert found == [("error", "unknown_node_type", f"{NODE}/a/type")], found


def test_fields_of_other_types_draw_unknown_field_warnings() -> None:
    found = diagnostics({"a": {"type": "sequence", "next_node": "z", "outputs": {"x": 1}, "iterator": "xs"},
                         "z": END})
    assert ("warning", "unknown_field", f"{NODE}/a/outputs") in found, found
    assert ("warning", "unknown_field", f"{NODE}/a/iterator") in found, found
