"""The logic, processing, verification, transform and terminate nodes (ckp.md §3.6, §3.10, §3.11, §3.14, §3.15),
and corners of the runtime across node types, run in-process through the interpreter. Loops, parallel nodes,
error resolution and frames, subflows and the static rules have files of their own (test_node_*.py)."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_harness import END, calc, doc, error, outputs, run_doc, setv

pytestmark = pytest.mark.unit


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
