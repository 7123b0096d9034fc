"""The interpreter's node and step semantics (ckp.md §3, §4), run in-process against compiled documents."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ckp_core.events import ErrorObject
from runtime_harness import EXAMPLES, ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit

END = {"type": "terminate"}


def log_step(step_id: str, message: str = "x") -> dict[str, Any]:
    return {"step_id": step_id, "action": "log", "message": message}


def setv(step_id: str, variable: str, value: Any) -> dict[str, Any]:
    return {"step_id": step_id, "action": "set_variable", "variable": variable, "value": value}


async def test_internal_variables_example_completes_with_typed_outputs() -> None:
    run = await run_doc(json.loads((EXAMPLES / "internal_variables.ckp.json").read_text()))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert run.outcome["outputs"]["result"] == "ok"


async def test_spec_example_10_1_scores_and_routes() -> None:
    document = {
        "procedure_id": "order_triage", "version": "1.0.0",
        "variables_schema": {
            "required": {"order_total": {"type": "number", "validation": {"min": 0}}},
            "optional": {"vip": {"type": "boolean", "default": False},
                         "region": {"type": "string", "default": "eu",
                                    "validation": {"allowed_values": ["eu", "us"]}}}},
        "workflow_graph": {"start_node": "score", "nodes": {
            "score": {"type": "sequence", "next_node": "route", "steps": [
                {"step_id": "calc", "action": "calculate", "expression": "if(vip, order_total * 1.2, order_total)",
                 "output_variable": "score"},
                {"step_id": "note", "action": "set_variable", "variable": "summary",
                 "value": {"total": "{{order_total}}", "label": "{{region}}-{{score}}"}}]},
            "route": {"type": "logic", "default_next_node": "standard",
                      "rules": [{"condition": "score >= 100 and region in ['eu', 'us']", "next_node": "fast_track"}]},
            "fast_track": {"type": "terminate", "outputs": {"lane": "fast", "summary": "{{summary}}"}},
            "standard": {"type": "terminate", "outputs": {"lane": "standard", "summary": "{{summary}}"}}}}}
    run = await run_doc(document, {"order_total": "100", "vip": "true"})
    assert run.outcome == {"status": "completed", "outputs": {"lane": "fast", "summary": {
        "total": 100, "label": "eu-120.0"}}}
    assert run.types() == ["node_started", "step_started", "step_completed", "step_started", "step_completed",
                           "node_completed", "node_started", "node_completed", "node_started", "node_completed"]


async def test_loop_collects_per_iteration_with_frames_and_continue_on_error() -> None:
    agent = ScriptedDispatcher({"lookup_price": [lambda r: {"amount": {"A-1": 12.5, "C-3": 7}[r.params["sku"]]}
                                                 if r.params["sku"] != "B-2" else (_ for _ in ()).throw(
                                                     _agent_error())]})
    document = doc({
        "each": {"type": "loop", "iterator": "skus", "iterator_variable": "sku", "index_variable": "i",
                 "body_node": "lookup", "collect_variable": "prices",
                 "collect_expression": {"sku": "{{sku}}", "price": "{{quote.amount}}"}, "errors_variable": "failed",
                 "continue_on_error": True, "next_node": "report"},
        "lookup": {"type": "sequence", "agent": "API", "steps": [
            {"step_id": "get_price", "action": "lookup_price", "sku": "{{sku}}", "output_variable": "quote"}]},
        "report": {"type": "terminate", "outputs": {"prices": "{{prices}}", "failed_count": "{{len(failed)}}"}},
    }, start="each", variables_schema={"skus": {"type": "array", "required": True}})
    run = await run_doc(document, {"skus": ["A-1", "B-2", "C-3"]}, agent)
    assert run.outcome is not None
    assert run.outcome["outputs"] == {"prices": [{"sku": "A-1", "price": 12.5}, {"sku": "C-3", "price": 7}],
                                      "failed_count": 1}
    keys = [r.idempotency_key for r in agent.requests]
    assert keys == [f"lo1:run-1:lookup:get_price:each[{i}]:1" for i in range(3)]
    assert [e.frame for e in run.of("node_started") if e.node_id == "lookup"] == ["each[0]", "each[1]", "each[2]"]
    completed = run.of("loop_completed")[0]
    assert (completed.iterations, completed.succeeded, completed.failed) == (3, 2, 1)


def _agent_error() -> Exception:
    from langorch_runtime.machine import StepError

    return StepError(ErrorObject(code="agent_error", message="unknown sku", error_code="not_found"))


async def test_loop_without_continue_on_error_fails_the_loop_node_with_the_cause() -> None:
    document = doc({
        "each": {"type": "loop", "iterator": "[1, 0, 2]", "iterator_variable": "n", "body_node": "div",
                 "next_node": "done"},
        "div": {"type": "sequence", "steps": [{"step_id": "c", "action": "calculate", "expression": "10 / n"}]},
        "done": END}, start="each")
    run = await run_doc(document)
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["error"]["code"] == "loop_iteration_failed"
    assert run.outcome["error"]["details"] == {"iteration": 1}
    assert run.outcome["error"]["cause"]["code"] == "expression_error"
    assert "done" not in [e.node_id for e in run.of("node_started")]


async def test_nested_loops_have_nested_frame_strings() -> None:
    document = doc({
        "outer": {"type": "loop", "iterator": "[1, 2]", "iterator_variable": "x", "body_node": "inner",
                  "next_node": "done"},
        "inner": {"type": "loop", "iterator": "['a', 'b']", "iterator_variable": "y", "body_node": "work",
                  "collect_variable": "pairs", "collect_expression": "{{x}}{{y}}"},
        "work": {"type": "sequence", "steps": [log_step("s", "{{x}}-{{y}}")]},
        "done": {"type": "terminate", "outputs": {"last": "{{pairs}}"}}}, start="outer")
    run = await run_doc(document)
    assert run.outcome is not None
    assert run.outcome["outputs"] == {"last": ["2a", "2b"]}
    frames = [e.frame for e in run.of("step_started")]
    # each iteration is a new frame, so "inner" is on its first visit in both
    assert frames == ["outer[0]/inner[0]", "outer[0]/inner[1]", "outer[1]/inner[0]", "outer[1]/inner[1]"]


PARALLEL_NODES: dict[str, Any] = {
    "fan": {"type": "parallel", "branches": [{"branch_id": "b1", "start_node": "one"},
                                             {"branch_id": "b2", "start_node": "two"}], "next_node": "join"},
    "one": {"type": "sequence", "next_node": "join", "steps": [setv("s", "left", 1), setv("t", "shared", "one")]},
    "two": {"type": "sequence", "next_node": "join", "steps": [setv("s", "right", 2), setv("t", "shared", "two")]},
    "join": {"type": "terminate", "outputs": {"left": "{{left}}", "right": "{{right}}", "shared": "{{shared}}",
                                              "results": "{{parallel_results}}"}},
}


async def test_parallel_all_merges_branch_deltas_in_declaration_order() -> None:
    run = await run_doc(doc(PARALLEL_NODES, start="fan"))
    assert run.outcome is not None
    outputs = run.outcome["outputs"]
    assert (outputs["left"], outputs["right"], outputs["shared"]) == (1, 2, "two")
    assert outputs["results"]["branches"] == {"b1": {"status": "completed", "error": None},
                                              "b2": {"status": "completed", "error": None}}
    [conflict] = run.of("parallel_merge_conflict")
    assert (conflict.variable, conflict.branches) == ("shared", ["b1", "b2"])
    assert {e.frame for e in run.of("step_started")} == {"fan/b1", "fan/b2"}


async def test_parallel_branch_failure_fail_stops_the_node() -> None:
    nodes = json.loads(json.dumps(PARALLEL_NODES))
    nodes["fan"]["branch_failure"] = "fail"
    nodes["two"]["steps"] = [{"step_id": "boom", "action": "calculate", "expression": "1 / 0"}]
    run = await run_doc(doc(nodes, start="fan"))
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "parallel_branch_failed"
    assert run.outcome["error"]["details"] == {"branch_id": "b2"}


async def test_parallel_any_keeps_only_the_winner() -> None:
    nodes = json.loads(json.dumps(PARALLEL_NODES))
    nodes["fan"]["wait_strategy"] = "first"
    nodes["fan"]["max_concurrency"] = 1
    run = await run_doc(doc(nodes, start="fan"))
    assert run.outcome is not None
    outputs = run.outcome["outputs"]
    assert outputs["results"]["winner"] == "b1"
    assert (outputs["left"], outputs["right"]) == (1, None)
    # b2 never started (max_concurrency 1): canceled, and reported like a started branch (§3.8 step 4)
    assert [(e.branch_id, e.status) for e in run.of("parallel_branch_completed")] == [("b1", "completed"),
                                                                                     ("b2", "canceled")]
    assert [(e.succeeded, e.canceled) for e in run.of("parallel_completed")] == [(1, 1)]


async def test_verification_failure_ends_the_run_and_the_next_node_never_runs() -> None:
    agent = ScriptedDispatcher({"extract_text": ["Other title"], "notify": [{"ok": True}]})
    document = doc({
        "a": {"type": "sequence", "agent": "WEB", "next_node": "check", "steps": [
            {"step_id": "t", "action": "extract_text", "output_variable": "title"}]},
        "check": {"type": "verification", "next_node": "after", "checks": [
            {"id": "title_ok", "condition": "title == 'Example Domain'", "message": "wrong title"}],
            "error_handlers": [{"action": "ignore"}]},
        "after": {"type": "sequence", "agent": "WEB", "next_node": "z",
                  "steps": [{"step_id": "n", "action": "notify"}]},
        "z": END})
    run = await run_doc(document, dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "verification_failed"
    assert [r.action for r in agent.requests] == ["extract_text"]


async def test_retry_policy_then_success_changes_the_key_per_attempt() -> None:
    flaky = ErrorObject(code="agent_unavailable", message="503", retryable=True)
    agent = ScriptedDispatcher({"fetch": [flaky, flaky, {"v": 1}]})
    document = doc({"a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [
        {"step_id": "f", "action": "fetch", "retry_config": {"max_retries": 3, "strategy": "fixed"},
         "output_variable": "r"}]}, "z": {"type": "terminate", "outputs": {"r": "{{r}}"}}})
    run = await run_doc(document, dispatcher=agent)
    assert run.outcome == {"status": "completed", "outputs": {"r": {"v": 1}}}
    assert [r.attempt for r in agent.requests] == [1, 2, 3]
    assert [e.source for e in run.of("step_retrying")] == ["retry_policy", "retry_policy"]


async def test_non_retryable_error_is_not_retried_by_policy() -> None:
    agent = ScriptedDispatcher({"fetch": [ErrorObject(code="agent_error", message="bad", retryable=False)]})
    document = doc({"a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [
        {"step_id": "f", "action": "fetch", "retry_on_failure": True}]}, "z": END})
    run = await run_doc(document, dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "agent_error"
    assert len(agent.requests) == 1


@pytest.mark.parametrize(("handler", "expected_status", "expected_next"), [
    ({"action": "ignore"}, "completed", "after"),
    ({"action": "ignore", "fallback_node": "fallback"}, "completed", "fallback"),
    ({"action": "escalate", "fallback_node": "fallback"}, "completed", "fallback"),
    ({"action": "fail"}, "failed", None),
    ({"error_type": "agent_error", "action": "retry", "max_retries": 1}, "failed", None),
    ({"error_type": "something_else", "action": "ignore"}, "failed", None),
    ({"error_type": "NoExecutorError", "action": "ignore"}, "completed", "after"),
])
async def test_step_error_handlers(handler: dict[str, Any], expected_status: str, expected_next: str | None) -> None:
    agent = ScriptedDispatcher({"fetch": [ErrorObject(code="agent_error", message="bad")]})
    if handler.get("error_type") == "NoExecutorError":
        agent = ScriptedDispatcher({})
    document = doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "after", "error_handlers": [handler], "steps": [
            {"step_id": "f", "action": "fetch", "output_variable": "r"}, log_step("later")]},
        "after": {"type": "terminate", "outputs": {"via": "after", "err": "{{error.code}}"}},
        "fallback": {"type": "terminate", "outputs": {"via": "fallback", "err": "{{error.code}}"}}})
    run = await run_doc(document, dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["status"] == expected_status
    if expected_next is not None:
        assert run.outcome["outputs"]["via"] == expected_next
    if handler.get("action") == "retry":
        assert [r.attempt for r in agent.requests] == [1, 2]
    if expected_next == "fallback":
        assert run.outcome["outputs"]["err"] == "agent_error"
        assert "later" not in [e.step_id for e in run.of("step_started")]


async def test_on_failure_recovery_path_completes_as_recovered() -> None:
    document = doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [{"step_id": "c", "action": "calculate",
                                                                "expression": "1 / 0"}]},
        "z": END,
        "rescue": {"type": "terminate", "outputs": {"code": "{{error.code}}"}}},
        global_config={"on_failure": "rescue"})
    run = await run_doc(document)
    assert run.outcome == {"status": "completed", "outputs": {"code": "expression_error"}, "recovered_via": "rescue"}
    assert run.of("recovery_started")[0].on_failure_node == "rescue"


async def test_terminate_failed_reports_terminated_failed_and_runs_error_actions() -> None:
    document = doc({"a": {"type": "terminate", "status": "failed", "outputs": {"why": "no"},
                          "cleanup_actions": [{"action": "log", "message": "cleanup"}],
                          "error_actions": [{"action": "log", "message": "error action"}]}})
    run = await run_doc(document)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "terminated_failed"
    assert [e.message for e in run.of("log")] == ["cleanup", "error action"]


async def test_processing_and_transform_nodes() -> None:
    document = doc({
        "a": {"type": "processing", "next_node": "t", "operations": [
            {"action": "set_variable", "variable": "rows", "value": [{"k": "x", "v": 1}, {"k": "y", "v": 5}]},
            {"action": "calculate", "expression": "len(rows)", "output_variable": "n"}]},
        "t": {"type": "transform", "next_node": "z", "transformations": [
            {"type": "filter", "source_variable": "rows", "expression": "v > 2", "output_variable": "big"}]},
        "z": {"type": "terminate", "outputs": {"n": "{{n}}", "big": "{{big}}"}}})
    run = await run_doc(document)
    assert run.outcome == {"status": "completed", "outputs": {"n": 2, "big": [{"k": "y", "v": 5}]}}


APPROVAL_DOC = doc({
    "review": {"type": "human_approval", "decision_type": "select_option", "prompt": "Refund {{amount}}?",
               "options": ["card", "bank_transfer", "deny"], "option_routes": {"deny": "denied"},
               "context_data": {"amount": "{{amount}}"}, "on_approve": "pay", "on_reject": "denied",
               "decision_variable": "choice"},
    "pay": {"type": "terminate", "outputs": {"method": "{{approval.review.decision}}", "by":
                                             "{{approval.review.decided_by}}", "choice": "{{choice}}"}},
    "denied": {"type": "terminate", "status": "failed", "outputs": {"reason": "{{approval.review.decision}}"}},
}, start="review", variables_schema={"amount": {"type": "number", "default": 120}})


async def test_approval_pauses_then_resumes_with_the_decision() -> None:
    run = await run_doc(APPROVAL_DOC)
    assert run.outcome is None
    [wait] = run.waits
    [requested] = run.of("approval_requested")
    assert (requested.prompt, requested.context_data, requested.suspends_run) == ("Refund 120?", {"amount": 120},
                                                                                   True)
    await run.resume(wait_id=wait["id"], decision="card", decided_by="user:alice", status="decided")
    assert run.outcome == {"status": "completed", "outputs": {"method": "card", "by": "user:alice",
                                                              "choice": "card"}}
    [received] = run.of("approval_decision_received")
    assert (received.routed_to, received.resumes_run) == ("pay", True)


@pytest.mark.parametrize(("resolution", "status", "outputs"), [
    ({"decision": "deny", "status": "decided"}, "failed", {"reason": "deny"}),
    ({"decision": "rejected", "status": "timed_out", "decided_by": "system:approvals", "source": "timeout"},
     "failed", {"reason": "rejected"}),
    ({"decision": "approved"}, "completed", {"method": "approved", "by": None, "choice": "approved"}),
])
async def test_approval_routes(resolution: dict[str, Any], status: str, outputs: dict[str, Any]) -> None:
    run = await run_doc(APPROVAL_DOC)
    await run.resume(wait_id=run.waits[0]["id"], **resolution)
    assert run.outcome is not None
    assert run.outcome["status"] == status
    assert run.outcome["outputs"] == outputs


async def test_approval_in_dry_run_resolves_at_once() -> None:
    document = json.loads(json.dumps(APPROVAL_DOC))
    document["global_config"] = {"execution_mode": "dry_run"}
    run = await run_doc(document)
    assert run.outcome is not None
    assert run.outcome["outputs"]["method"] == "card"
    assert run.of("approval_requested") == []
    assert run.of("approval_auto_resolved")[0].decision == "card"


async def test_approvals_in_two_branches_suspend_once_both_are_waiting() -> None:
    document = doc({
        "fan": {"type": "parallel", "branches": [{"branch_id": "x", "start_node": "ax"},
                                                 {"branch_id": "y", "start_node": "ay"}], "next_node": "z"},
        "ax": {"type": "human_approval", "on_approve": "z", "on_reject": "z"},
        "ay": {"type": "human_approval", "on_approve": "z", "on_reject": "z"},
        "z": {"type": "terminate", "outputs": {"x": "{{approval.ax.decision}}", "y": "{{approval.ay.decision}}"}},
    }, start="fan")
    run = await run_doc(document)
    assert len(run.waits) == 2
    first, second = run.waits
    await run.resume(wait_id=first["id"], decision="approved")
    assert run.outcome is None
    await run.resume(wait_id=second["id"], decision="rejected")
    assert run.outcome == {"status": "completed", "outputs": {"x": "approved", "y": "rejected"}}


async def test_max_hops_bounds_a_cycle() -> None:
    document = doc({"a": {"type": "sequence", "next_node": "b", "steps": []},
                    "b": {"type": "logic", "default_next_node": "a"}}, global_config={"max_hops": 5})
    run = await run_doc(document)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "max_hops_exceeded"
    assert len(run.of("node_started")) == 5


async def test_test_overrides_dry_run_and_mocks_answer_channel_steps() -> None:
    steps = [{"step_id": "o", "action": "fetch", "output_variable": "o"},
             {"step_id": "m", "action": "fetch", "output_variable": "m"}]
    base = doc({"a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": steps},
                "z": {"type": "terminate", "outputs": {"o": "{{o}}", "m": "{{m}}"}}})
    overridden = await run_doc({**base, "global_config": {"test_data_overrides": {"a.o": {"v": 1}},
                                                          "mock_external_calls": True}})
    assert overridden.outcome is not None
    assert overridden.outcome["outputs"] == {"o": {"v": 1}, "m": {"mocked": True, "action": "fetch",
                                                                  "channel": "api"}}
    dry = await run_doc({**base, "global_config": {"execution_mode": "dry_run"}})
    assert dry.outcome is not None
    assert dry.outcome["outputs"]["o"] == {"dry_run": True, "skipped_action": "fetch", "channel": "api"}


async def test_no_agent_fails_with_no_executor_naming_channel_and_action() -> None:
    run = await run_doc(json.loads((EXAMPLES / "web_title_check.ckp.json").read_text()))
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "no_executor"
    assert "web" in run.outcome["error"]["message"]


def _delegating(request: Any) -> Any:
    from langorch_runtime.machine import Delegated

    assert request.callback is not None
    raise Delegated(request.callback.delegation_id, agent_id="hybrid-1")


ASYNC_DOC = doc({
    "a": {"type": "sequence", "agent": "HYBRID", "next_node": "z", "steps": [
        {"step_id": "before", "action": "tool", "output_variable": "t"},
        {"step_id": "flow", "action": "run_flow", "output_variable": "f"},
        {"step_id": "after", "action": "tool", "output_variable": "u"}]},
    "z": {"type": "terminate", "outputs": {"f": "{{f}}", "u": "{{u}}"}}})


async def test_async_delegation_pauses_until_the_callback_then_continues_after_the_step() -> None:
    from langorch_runtime.machine import CallbackConfig

    agent = ScriptedDispatcher({"tool": [{"ok": 1}], "run_flow": [_delegating]})
    run = await run_doc(ASYNC_DOC, dispatcher=agent,
                        callbacks=CallbackConfig(key=b"k" * 32, public_url="http://gw", timeout_s=60))
    assert run.outcome is None
    [wait] = run.waits
    assert wait["kind"] == "callback"
    [delegated] = run.of("workflow_delegated")
    assert delegated.callback_url == "http://gw/api/runs/run-1/callback"
    assert [r.action for r in agent.requests] == ["tool", "run_flow"]
    await run.resume(wait_id=wait["id"], status="success", output={"done": True})
    assert run.outcome == {"status": "completed", "outputs": {"f": {"done": True}, "u": {"ok": 1}}}
    assert [r.action for r in agent.requests] == ["tool", "run_flow", "tool"]
    assert [e.step_id for e in run.of("step_replayed")] == []
    assert run.of("workflow_callback_received")[0].status == "success"


async def test_async_failure_callback_is_a_step_error() -> None:
    from langorch_runtime.machine import CallbackConfig

    agent = ScriptedDispatcher({"tool": [{"ok": 1}], "run_flow": [_delegating]})
    run = await run_doc(ASYNC_DOC, dispatcher=agent,
                        callbacks=CallbackConfig(key=b"k" * 32, public_url="http://gw", timeout_s=60))
    await run.resume(wait_id=run.waits[0]["id"], status="failure", error="login failed", error_code="bad_login")
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "bad_login"
    assert [r.action for r in agent.requests] == ["tool", "run_flow"]


async def test_run_deadline_fails_the_executing_node_and_bypasses_its_handlers() -> None:
    import asyncio

    document = doc({"a": {"type": "sequence", "next_node": "z", "error_handlers": [{"action": "ignore"}],
                          "steps": [{"step_id": "w", "action": "wait", "duration_ms": 5000}]},
                    "z": END, "rescue": {"type": "terminate", "outputs": {"code": "{{error.code}}"}}},
                   global_config={"timeout_ms": 50, "on_failure": "rescue"})
    # a real sleep here: the deadline bounds executing time
    run = await run_doc(document, sleep=asyncio.sleep)
    assert run.outcome == {"status": "completed", "outputs": {"code": "deadline_exceeded"}, "recovered_via": "rescue"}
    assert [e.error.code for e in run.of("node_error")] == ["deadline_exceeded"]


@pytest.mark.parametrize(("on_breach", "enforce", "expected"), [
    ("warn", False, {"status": "completed", "via": "z", "breaches": 1}),
    ("fail", False, {"status": "failed", "via": None, "breaches": 1}),
    ("escalate", False, {"status": "completed", "via": "esc", "breaches": 1}),
    ("fail", True, {"status": "failed", "via": None, "breaches": 1}),
    ("escalate", True, {"status": "completed", "via": "esc", "breaches": 1}),
])
async def test_sla_breaches(on_breach: str, enforce: bool, expected: dict[str, Any]) -> None:
    import asyncio

    sla: dict[str, Any] = {"max_duration_ms": 30, "on_breach": on_breach, "enforce": enforce}
    if on_breach == "escalate":
        sla["escalation_handler"] = "esc"
    document = doc({"a": {"type": "sequence", "next_node": "z", "sla": sla,
                          "steps": [{"step_id": "w", "action": "wait", "duration_ms": 120 if not enforce else 5000}]},
                    "z": {"type": "terminate", "outputs": {"via": "z", "err": "{{error.code}}"}},
                    "esc": {"type": "terminate", "outputs": {"via": "esc", "err": "{{error.code}}"}}})
    run = await run_doc(document, sleep=asyncio.sleep)
    assert run.outcome is not None
    assert run.outcome["status"] == expected["status"]
    if expected["via"] is not None:
        assert run.outcome["outputs"]["via"] == expected["via"]
    else:
        assert run.outcome["error"]["code"] == "sla_breached"
    breaches = run.of("sla_breached")
    assert len(breaches) == expected["breaches"]
    assert breaches[0].enforced is enforce
    if expected["via"] == "esc":
        assert run.outcome["outputs"]["err"] == "sla_breached"


@pytest.mark.parametrize(("resolution", "status"), [
    ({"decision": "approved"}, "completed"),
    ({"decision": "rejected"}, "failed"),
    ({"decision": "timeout", "status": "timed_out", "source": "timeout"}, None),
])
async def test_product_enrichment_premium_path_pauses_after_both_branches(resolution: dict[str, Any],
                                                                        status: str | None) -> None:
    document = json.loads((EXAMPLES / "product_enrichment_pipeline.ckp.json").read_text())
    run = await run_doc(document, {"product_id": 7, "enrichment_mode": "premium"})
    assert run.outcome is None
    completed_branches = [e.branch_id for e in run.of("parallel_branch_completed")]
    assert sorted(completed_branches) == ["sentiment_branch", "tags_branch"]
    [wait] = run.waits
    await run.resume(wait_id=wait["id"], **resolution)
    assert run.outcome is not None
    received = run.of("approval_decision_received")[0]
    if status is not None:
        assert run.outcome["status"] == status
    else:  # the timeout routes to its own node
        assert received.routed_to == document["workflow_graph"]["nodes"][wait["node_id"]]["on_timeout"]


async def test_artifacts_named_by_a_step_result_are_recorded() -> None:
    agent = ScriptedDispatcher({"snap": [{"screenshot": "file:///tmp/a.png",
                                          "artifacts": [{"kind": "report", "uri": "s3://b/r.pdf", "name": "r"}],
                                          "uri": "not-an-artifact"}]})
    document = doc({"a": {"type": "sequence", "agent": "WEB", "next_node": "z",
                          "steps": [{"step_id": "s", "action": "snap", "output_variable": "out"}]},
                    "z": {"type": "terminate", "outputs": {"out": "{{out}}"}}})
    run = await run_doc(document, dispatcher=agent)
    created = run.of("artifact_created")
    assert [(e.kind, e.uri, e.stored) for e in created] == [("screenshot", "file:///tmp/a.png", False),
                                                           ("report", "s3://b/r.pdf", False)]
    assert run.outcome is not None
    assert run.outcome["outputs"]["out"]["uri"] == "not-an-artifact"


@pytest.mark.parametrize(("on_failure", "status", "runs_of_a"), [
    ("throw_exception", "completed", 1),  # the node's ignore handler applies
    ("fail_workflow", "failed", 1),  # bypasses the node's handlers
    ("retry_node", "completed", 3),  # re-runs the node max_node_retries times, then as throw_exception
])
async def test_sequence_validations(on_failure: str, status: str, runs_of_a: int) -> None:
    document = doc({
        "a": {"type": "sequence", "next_node": "z", "error_handlers": [{"error_type": "validation_failed",
                                                                        "action": "ignore"}],
              "steps": [log_step("s")],
              "validations": [{"id": "v", "condition": "1 > 2", "on_failure": on_failure, "max_node_retries": 2,
                               "message": "one is not more than {{'two'}}"}]},
        "z": END})
    run = await run_doc(document)
    assert run.outcome is not None
    assert run.outcome["status"] == status
    assert len([e for e in run.of("node_started") if e.node_id == "a"]) == runs_of_a
    failures = run.of("validation_failed")
    assert failures[0].message == "one is not more than two"
    assert failures[0].on_failure == on_failure


async def test_step_timeout_is_retryable_and_reported() -> None:
    import asyncio

    async def hang(request: Any) -> Any:
        await asyncio.sleep(10)

    agent = ScriptedDispatcher({"slow": [hang], "fast": [{"ok": True}]})
    document = doc({"a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [
        {"step_id": "s", "action": "slow", "timeout_ms": 20, "retry_config": {"max_retries": 1, "strategy": "fixed",
                                                                             "retry_delay_ms": 1}}]},
                    "z": END})
    run = await run_doc(document, dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "step_timeout"
    assert [e.timeout_ms for e in run.of("step_timeout")] == [20, 20]
    assert len(run.of("step_retrying")) == 1


async def test_failure_and_completion_screenshots_go_to_the_channel_agent() -> None:
    agent = ScriptedDispatcher({"click": [ErrorObject(code="agent_error", message="no button")],
                                "type": [{"typed": True}], "screenshot": [{"screenshot": "file:///tmp/s.png"}]})
    document = doc({"a": {"type": "sequence", "agent": "WEB", "next_node": "z",
                          "error_handlers": [{"action": "screenshot_and_fail"}],
                          "steps": [{"step_id": "t", "action": "type", "screenshot_on_complete": True},
                                    {"step_id": "c", "action": "click"}]},
                    "z": END})
    run = await run_doc(document, dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "agent_error"
    shots = [r for r in agent.requests if r.action == "screenshot"]
    assert [r.step_id for r in shots] == ["t~screenshot", "c~screenshot"]
    assert [r.params["reason"] for r in shots] == ["on_complete", "screenshot_and_fail"]
    assert len(run.of("artifact_created")) == 2
    assert run.of("screenshot_requested") == []


async def test_without_an_agent_a_failure_screenshot_is_requested() -> None:
    document = doc({"a": {"type": "sequence", "agent": "WEB", "next_node": "z",
                          "steps": [{"step_id": "c", "action": "click"}]}, "z": END},
                   global_config={"screenshot_on_fail": True})
    run = await run_doc(document)
    [requested] = run.of("screenshot_requested")
    assert (requested.reason, requested.error.code if requested.error else None) == ("screenshot_on_fail",
                                                                                    "no_executor")


async def test_agent_affinity_is_kept_in_the_run_state() -> None:
    seen: list[str | None] = []

    def answer(request: Any) -> Any:
        seen.append(request.affinity)
        request.agent_id = "agent-7"
        return {"ok": True}

    agent = ScriptedDispatcher({"go": [answer]})
    document = doc({"a": {"type": "sequence", "agent": "API", "next_node": "g", "steps": [
        {"step_id": "one", "action": "go"}]},
        "g": {"type": "human_approval", "on_approve": "b", "on_reject": "b"},
        "b": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "two", "action": "go"}]},
        "z": END})
    run = await run_doc(document, dispatcher=agent)
    assert run.final["affinity"] == {"api": "agent-7"}
    run.machine.affinity = {}  # a fresh replica resuming the run knows only the persisted state
    await run.resume(wait_id=run.waits[0]["id"], decision="approved")
    assert seen == [None, "agent-7"]
