"""Error resolution (ckp.md §3.3) and frames with their pauses (§3.2), run in-process through the
interpreter."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_harness import END, calc, doc, error, fan, outputs, run_doc, setv

pytestmark = pytest.mark.unit


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
