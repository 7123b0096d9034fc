"""The run-event contract of ckp.md §8 and the error objects of §7.16, pinned in-process.

Every event a scenario emits is checked against the §8 table: the spec's payload fields are present (with the
position fields of node- and step-level events), error fields are full error objects, ``binding_kind`` is one of
the spec's values. Targeted tests then pin triggers and values the table states."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from ckp_core.events import EVENT_TYPES, ErrorObject, EventData
from runtime_harness import Run, ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit

# ckp.md §8, column "Payload" (``run_completed``'s ``mode``/``message`` are for validation_only runs only)
SPEC: dict[str, tuple[str, ...]] = {
    "run_created": ("procedure_id", "procedure_version", "release_channel", "input_vars", "trigger_type",
                    "triggered_by", "parent_run_id", "parent_node_id", "root_run_id", "rerun_of", "execution_mode"),
    "execution_started": ("entry_node_id", "execution_mode"),
    "execution_resumed": ("entry_node_id", "resume_reason"),
    "execution_recovered": ("delivery_count", "checkpoint_id"),
    "run_suspended": ("status", "waiting_on"),
    "run_completed": ("outputs", "recovered_via"),
    "run_failed": ("error", "outputs", "recovered_via", "recovery_error"),
    "run_cancel_requested": ("reason", "requested_by"),
    "run_canceled": ("reason", "requested_by"),
    "run_retry_requested": ("retry_count", "automatic", "failure_node_id"),
    "run_deleted": (),
    "recovery_started": ("on_failure_node", "error"),
    "checkpoint_saved": ("reason", "checkpoint_id"),
    "node_started": ("node_type", "node_name", "visit"),
    "node_completed": ("node_type", "next_node", "duration_ms"),
    "node_paused": ("reason", "wait_id"),
    "node_error": ("error", "routed_to"),
    "sla_breached": ("limit_ms", "elapsed_ms", "on_breach", "escalation_handler", "enforced"),
    "step_started": ("action", "binding_kind", "channel", "agent_id", "idempotency_key", "params"),
    "step_completed": ("action", "output_variable", "duration_ms", "retry_count", "suppressed_error"),
    "step_replayed": ("action", "output_variable", "original_attempt"),
    "step_retrying": ("action", "delay_ms", "next_attempt", "source", "error"),
    "step_timeout": ("action", "timeout_ms", "binding_kind"),
    "step_failed": ("action", "error"),
    "step_escalated": ("handler_index", "fallback_node", "error"),
    "step_error_notification": ("error_type", "error", "handler_action"),
    "step_test_override_applied": ("override_key",),
    "step_mock_applied": ("action", "binding_kind", "channel"),
    "dry_run_step_skipped": ("action", "binding_kind", "channel"),
    "screenshot_requested": ("reason", "error"),
    "artifact_created": ("artifact_id", "kind", "name", "uri", "mime_type", "size_bytes", "stored"),
    "pool_saturated": ("agent_id", "channel", "resource_key", "pool_id"),
    "rate_limit_wait": ("limiter", "waited_ms"),
    "template_warning": ("variable", "reason", "location"),
    "validation_failed": ("validation_id", "message", "on_failure"),
    "verification_warning": ("check_id", "message"),
    "log": ("level", "message"),
    "notification_requested": ("notification_id", "channel", "recipients", "subject", "message", "metadata"),
    "audit_log": ("entry",),
    "loop_started": ("total", "iterations"),
    "loop_iteration": ("iteration", "total", "item_preview"),
    "loop_iteration_failed": ("iteration", "error"),
    "loop_completed": ("iterations", "succeeded", "failed"),
    "parallel_started": ("branches", "wait_strategy"),
    "parallel_branch_completed": ("branch_id", "status", "error"),
    "parallel_merge_conflict": ("variable", "branches"),
    "parallel_completed": ("succeeded", "failed", "canceled", "winner"),
    "subflow_started": ("child_run_id", "procedure_id", "version", "attempt", "suspends_run"),
    "subflow_completed": ("child_run_id", "procedure_id", "version", "resumes_run", "mapped_variables"),
    "subflow_failed": ("child_run_id", "procedure_id", "version", "resumes_run", "on_failure", "error"),
    "approval_requested": ("approval_id", "node_name", "decision_type", "options", "prompt", "context_data",
                           "expires_at", "timeout_action", "approval_level", "escalation_contact", "suspends_run"),
    "approval_decision_received": ("approval_id", "status", "decision", "decided_by", "comment", "source",
                                   "routed_to", "resumes_run"),
    "approval_auto_resolved": ("decision", "payload", "routed_to"),
    "workflow_delegated": ("delegation_id", "action", "agent_id", "agent_url", "callback_url", "expires_at",
                           "dispatch_mode", "suspends_run"),
    "workflow_callback_received": ("delegation_id", "status", "output", "error", "error_code", "resumes_run"),
    "callback_timed_out": ("delegation_id", "timeout_s", "resumes_run"),
    "llm_usage": ("model", "requested_model", "provider_host", "prompt_tokens", "completion_tokens", "total_tokens",
                  "estimated_cost_usd", "usage_reported", "latency_ms", "attempt", "fallback_attempt"),
    "llm_route_selected": ("requested", "chosen", "valid"),
    "budget_exceeded": ("max_cost_usd", "spent_usd", "projected_usd"),
}
RUN_LEVEL = {"run_created", "execution_started", "execution_resumed", "execution_recovered", "run_suspended",
             "run_completed", "run_failed", "run_cancel_requested", "run_canceled", "run_retry_requested",
             "run_deleted", "recovery_started"}
STEP_LEVEL = {"step_started", "step_completed", "step_replayed", "step_retrying", "step_timeout", "step_failed"}
ERROR_FIELDS = ("code", "message", "retryable", "node_id", "step_id", "frame", "attempt", "type", "error_code",
                "http_status", "details", "cause")
NULLABLE_ERRORS = {("step_completed", "suppressed_error"), ("run_failed", "recovery_error"),
                   ("screenshot_requested", "error"), ("parallel_branch_completed", "error"),
                   ("subflow_failed", "error"), ("workflow_callback_received", "error")}
BINDING_KINDS = {"internal", "agent_http", "agent_workflow", "mcp_tool", "llm", "channel"}
KEY = re.compile(r"^lo1:.+:\d+$")


def check_error(error: Any) -> None:
    assert isinstance(error, dict), error
    assert set(ERROR_FIELDS) <= set(error), sorted(error)
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert isinstance(error["retryable"], bool)
    assert isinstance(error["details"], dict)


def check(event: EventData) -> dict[str, Any]:
    """One event against §8: its payload fields, position fields, error objects and value kinds."""
    kind = event.TYPE
    assert kind in SPEC, f"{kind} is not a run event of ckp.md §8"
    data = event.model_dump(mode="json")
    missing = [f for f in SPEC[kind] if f not in data]
    assert not missing, f"{kind} lacks {missing}: {data}"
    if kind not in RUN_LEVEL and kind != "template_warning":
        assert "node_id" in data, f"{kind} lacks position fields: {data}"
        assert "frame" in data, f"{kind} lacks position fields: {data}"
        if data["node_id"] is not None and kind.startswith(("node_", "step_")):
            assert isinstance(data["frame"], str), data
            assert data["frame"], data
    if kind in STEP_LEVEL:
        assert isinstance(data["step_id"], str), data
        assert data["step_id"], data
        if kind != "step_replayed":
            assert isinstance(data["attempt"], int), data
            assert data["attempt"] >= 1, data
    for name in ("error", "suppressed_error", "recovery_error"):
        if name in data and not (data[name] is None and (kind, name) in NULLABLE_ERRORS):
            check_error(data[name])
    if "binding_kind" in data:
        assert data["binding_kind"] in BINDING_KINDS, data
    for name in ("duration_ms", "delay_ms", "timeout_ms", "limit_ms", "elapsed_ms", "waited_ms"):
        if name in data:
            assert isinstance(data[name], int), (name, data)
            assert data[name] >= 0, (name, data)
    if kind == "step_started":
        assert KEY.match(data["idempotency_key"]), data
        assert isinstance(data["params"], dict)
    if kind == "template_warning":
        assert set(data["location"]) == {"node_id", "step_id", "field"}, data
    return data


def checked(run: Run) -> Run:
    for event in run.events:
        check(event)
    return run


def payload(run: Run, kind: str) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json") for e in run.of(kind)]


def err(code: str, *, retryable: bool = False, **extra: Any) -> ErrorObject:
    return ErrorObject(code=code, message=f"{code} from the agent", retryable=retryable, **extra)


# --- the registry -------------------------------------------------------------------------------------------------


def test_every_run_event_of_the_spec_is_registered_with_its_payload_fields() -> None:
    for kind, fields in SPEC.items():
        cls = EVENT_TYPES.get(kind)
        assert cls is not None, f"{kind} has no payload model"
        assert cls.AGGREGATE == "run", kind
        missing = [f for f in fields if f not in cls.model_fields]
        assert not missing, f"{kind}: {missing}"


def test_error_object_has_the_fields_of_7_16_and_defaults_to_not_retryable() -> None:
    dumped = ErrorObject(code="x", message="m").model_dump(mode="json")
    assert tuple(dumped) == ERROR_FIELDS
    assert dumped["retryable"] is False
    assert dumped["details"] == {}
    assert dumped["cause"] is None


# --- node and step lifecycle ---------------------------------------------------------------------------------------


async def test_internal_sequence_emits_node_and_step_events_with_positions() -> None:
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "description": "Set things", "next_node": "z", "steps": [
            {"step_id": "s1", "action": "set_variable", "variable": "x", "value": 5}]},
        "z": {"type": "terminate", "outputs": {"x": "{{x}}"}}})))
    [started, _] = payload(run, "node_started")
    assert (started["node_id"], started["frame"], started["node_type"], started["node_name"], started["visit"]) == \
        ("a", "-", "sequence", "Set things", 1)
    [step] = payload(run, "step_started")
    assert (step["step_id"], step["attempt"], step["action"], step["binding_kind"], step["agent_id"]) == \
        ("s1", 1, "set_variable", "internal", None)
    assert step["idempotency_key"] == "lo1:run-1:a:s1:-:1"
    assert step["params"]["value"] == 5
    [done] = payload(run, "step_completed")
    assert (done["retry_count"], done["suppressed_error"], done["output_variable"]) == (0, None, None)
    completed = payload(run, "node_completed")
    assert [(c["node_id"], c["node_type"], c["next_node"]) for c in completed] == [
        ("a", "sequence", "z"), ("z", "terminate", None)]


async def test_retry_policy_emits_step_retrying_then_step_failed_and_node_error() -> None:
    agent = ScriptedDispatcher({"fetch": [err("agent_unavailable", retryable=True, http_status=503)]})
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [
            {"step_id": "f", "action": "fetch", "retry_config": {"max_retries": 1, "strategy": "fixed",
                                                                 "retry_delay_ms": 5}}]},
        "z": {"type": "terminate"}}), dispatcher=agent))
    [retrying] = payload(run, "step_retrying")
    assert (retrying["attempt"], retrying["next_attempt"], retrying["source"], retrying["delay_ms"]) == \
        (1, 2, "retry_policy", 5)
    assert retrying["error"]["code"] == "agent_unavailable"
    assert retrying["error"]["retryable"] is True
    assert [s["attempt"] for s in payload(run, "step_started")] == [1, 2]
    keys = [s["idempotency_key"] for s in payload(run, "step_started")]
    assert keys == ["lo1:run-1:a:f:-:1", "lo1:run-1:a:f:-:2"]
    [failed] = payload(run, "step_failed")
    assert (failed["attempt"], failed["action"], failed["error"]["attempt"], failed["error"]["step_id"]) == \
        (2, "fetch", 2, "f")
    [node_error] = payload(run, "node_error")
    assert node_error["routed_to"] is None
    assert node_error["error"]["node_id"] == "a"
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["error"]["code"] == "agent_unavailable"


async def test_handler_retry_is_step_retrying_with_source_error_handler() -> None:
    agent = ScriptedDispatcher({"fetch": [err("agent_error"), {"ok": 1}]})
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "f", "action": "fetch"}],
              "error_handlers": [{"error_type": "agent_error", "action": "retry", "max_retries": 1,
                                  "delay_ms": 7}]},
        "z": {"type": "terminate"}}), dispatcher=agent))
    [retrying] = payload(run, "step_retrying")
    assert (retrying["source"], retrying["delay_ms"], retrying["next_attempt"]) == ("error_handler", 7, 2)
    [done] = payload(run, "step_completed")
    assert (done["attempt"], done["retry_count"]) == (2, 1)


async def test_escalate_and_notify_handlers_and_fallback_routing() -> None:
    agent = ScriptedDispatcher({"fetch": [err("agent_error", type="Rejected")]})
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "f", "action": "fetch"}],
              "error_handlers": [{"error_type": "*", "action": "escalate", "fallback_node": "fb",
                                  "notify_on_error": True}]},
        "fb": {"type": "terminate", "outputs": {"code": "{{error.code}}"}},
        "z": {"type": "terminate"}}), dispatcher=agent))
    [note] = payload(run, "step_error_notification")
    assert (note["error_type"], note["handler_action"], note["step_id"]) == ("*", "escalate", "f")
    [esc] = payload(run, "step_escalated")
    assert (esc["handler_index"], esc["fallback_node"], esc["step_id"]) == (0, "fb", "f")
    [node_error] = payload(run, "node_error")
    assert node_error["routed_to"] == "fb"
    assert run.outcome == {"status": "completed", "outputs": {"code": "agent_error"}}


async def test_ignored_step_error_is_step_completed_with_suppressed_error() -> None:
    agent = ScriptedDispatcher({"fetch": [err("agent_http_404", http_status=404)]})
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z",
              "steps": [{"step_id": "f", "action": "fetch", "output_variable": "got"}],
              "error_handlers": [{"action": "ignore"}]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}"}}}), dispatcher=agent))
    [done] = payload(run, "step_completed")
    assert done["suppressed_error"]["code"] == "agent_http_404"
    assert done["suppressed_error"]["http_status"] == 404
    assert done["output_variable"] == "got"
    assert not run.of("step_failed")
    assert not run.of("node_error")


async def test_step_timeout_event_and_retryable_step_timeout_error() -> None:
    async def slow(request: Any) -> Any:
        await asyncio.sleep(5)
        return "late"

    agent = ScriptedDispatcher({"slow": [slow]})
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z",
              "steps": [{"step_id": "s", "action": "slow", "timeout_ms": 30}]},
        "z": {"type": "terminate"}}), dispatcher=agent))
    [timeout] = payload(run, "step_timeout")
    assert (timeout["action"], timeout["timeout_ms"], timeout["step_id"], timeout["attempt"]) == ("slow", 30, "s", 1)
    assert run.outcome is not None
    assert (run.outcome["error"]["code"], run.outcome["error"]["retryable"]) == ("step_timeout", True)


# --- run-level outcomes -----------------------------------------------------------------------------------------


async def test_recovery_path_emits_recovery_started_and_records_recovered_via() -> None:
    run = checked(await run_doc(doc({
        "a": {"type": "logic", "rules": [{"condition": "1 > 2", "next_node": "z"}]},
        "rescue": {"type": "terminate", "outputs": {"was": "{{error.code}}"}},
        "z": {"type": "terminate"}}, global_config={"on_failure": "rescue"})))
    [started] = payload(run, "recovery_started")
    assert started["on_failure_node"] == "rescue"
    assert (started["error"]["code"], started["error"]["node_id"], started["error"]["retryable"]) == \
        ("logic_no_route", "a", False)
    assert run.outcome == {"status": "completed", "outputs": {"was": "logic_no_route"}, "recovered_via": "rescue"}


async def test_terminate_failed_is_terminated_failed_at_a_failure_point() -> None:
    """§7.12: a run that failed at a terminate node has that node as its failure point (a retry restarts there
    and ``run_retry_requested.failure_node_id`` names it)."""
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "next_node": "stop", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "x", "value": 1}]},
        "stop": {"type": "terminate", "status": "failed", "outputs": {"x": "{{x}}"}}})))
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    check_error(run.outcome["error"])
    assert (run.outcome["error"]["code"], run.outcome["error"]["retryable"], run.outcome["error"]["node_id"]) == \
        ("terminated_failed", False, "stop")
    assert run.outcome["outputs"] == {"x": 1}
    assert run.outcome["error"]["frame"] == "-"  # §7.16: the error object names where it happened
    assert (run.final.get("failure_point") or {}).get("node_id") == "stop"


async def test_deadline_exceeded_bypasses_node_handlers_and_is_not_retryable() -> None:
    async def slow(request: Any) -> Any:
        await asyncio.sleep(5)
        return "late"

    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "s", "action": "slow"}],
              "error_handlers": [{"action": "ignore"}]},
        "z": {"type": "terminate"}}, global_config={"timeout_ms": 50}),
        dispatcher=ScriptedDispatcher({"slow": [slow]})))
    [node_error] = payload(run, "node_error")
    assert node_error["error"]["code"] == "deadline_exceeded"
    assert node_error["error"]["retryable"] is False
    assert node_error["routed_to"] is None
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "deadline_exceeded"
    # §7.12: the node the deadline cut off is the failure point (a retry restarts it)
    assert (run.final.get("failure_point") or {}).get("node_id") == "a"


async def test_deadline_exceeded_goes_to_the_recovery_path() -> None:
    """§7.11: on expiry the node fails with ``deadline_exceeded`` and the recovery path runs (with its own grace)."""
    async def slow(request: Any) -> Any:
        await asyncio.sleep(5)
        return "late"

    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "s", "action": "slow"}]},
        "rescue": {"type": "terminate", "outputs": {"was": "{{error.code}}"}},
        "z": {"type": "terminate"}}, global_config={"timeout_ms": 50, "on_failure": "rescue"}),
        dispatcher=ScriptedDispatcher({"slow": [slow]})))
    [started] = payload(run, "recovery_started")
    assert (started["on_failure_node"], started["error"]["code"]) == ("rescue", "deadline_exceeded")
    assert run.outcome == {"status": "completed", "outputs": {"was": "deadline_exceeded"}, "recovered_via": "rescue"}


async def test_max_hops_exceeded_is_a_node_error_of_the_cycling_node() -> None:
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "next_node": "a", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "x", "value": 1}]}},
        global_config={"max_hops": 3})))
    [node_error] = payload(run, "node_error")
    assert (node_error["node_id"], node_error["error"]["code"], node_error["error"]["retryable"]) == \
        ("a", "max_hops_exceeded", False)
    assert len(run.of("node_started")) == 3


async def test_is_checkpoint_emits_checkpoint_saved_with_the_saved_checkpoint_id() -> None:
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "is_checkpoint": True, "next_node": "z", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "x", "value": 1}]},
        "z": {"type": "terminate"}})))
    [saved] = payload(run, "checkpoint_saved")
    assert (saved["reason"], saved["node_id"], saved["frame"]) == ("is_checkpoint", "a", "-")
    ids = [c.config["configurable"]["checkpoint_id"] async for c in run.graph.aget_state_history(run.config)]
    assert saved["checkpoint_id"] in ids


async def test_state_too_large_fails_the_writing_node() -> None:
    """§2.3 / §7.16: a variable over 1 MiB (canonical JSON) fails the node that wrote it with state_too_large."""
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "big", "value": "x" * (1024 * 1024 + 10)}]},
        "z": {"type": "terminate"}})))
    [node_error] = payload(run, "node_error")
    assert node_error["node_id"] == "a"
    assert (node_error["error"]["code"], node_error["error"]["retryable"]) == ("state_too_large", False)
    assert node_error["error"]["details"].get("variable") == "big"
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "state_too_large"
    assert "big" not in (run.final.get("vars") or {})


async def test_a_value_under_the_limit_is_kept() -> None:
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "next_node": "z", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "big", "value": "x" * (1024 * 1024 - 10)}]},
        "z": {"type": "terminate"}})))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"


# --- node types ----------------------------------------------------------------------------------------------------


async def test_loop_and_parallel_payloads() -> None:
    run = checked(await run_doc(doc({
        "each": {"type": "loop", "iterator": "[1, 2, 3]", "iterator_variable": "x", "body_node": "b",
                 "continue_on_error": True, "next_node": "fan"},
        "b": {"type": "sequence", "steps": [{"step_id": "c", "action": "calculate", "expression": "10 / (x - 2)",
                                             "output_variable": "y"}]},
        "fan": {"type": "parallel", "next_node": "z", "branches": [
            {"branch_id": "p", "start_node": "p1"}, {"branch_id": "q", "start_node": "q1"}]},
        "p1": {"type": "sequence", "next_node": "z", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "v", "value": 1}]},
        "q1": {"type": "sequence", "next_node": "z", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "v", "value": 2}]},
        "z": {"type": "terminate"}}, start="each")))
    [started] = payload(run, "loop_started")
    assert (started["total"], started["iterations"]) == (3, 3)
    assert [(i["iteration"], i["total"], i["item_preview"]) for i in payload(run, "loop_iteration")] == [
        (0, 3, "1"), (1, 3, "2"), (2, 3, "3")]
    assert [i["variables"] for i in payload(run, "loop_iteration")] == [{"x": 1}, {"x": 2}, {"x": 3}]
    [failed] = payload(run, "loop_iteration_failed")
    assert failed["iteration"] == 1
    assert failed["error"]["code"] == "expression_error"
    assert failed["error"]["retryable"] is False
    [done] = payload(run, "loop_completed")
    assert (done["iterations"], done["succeeded"], done["failed"]) == (3, 2, 1)
    [par] = payload(run, "parallel_started")
    assert (par["branches"], par["wait_strategy"]) == (["p", "q"], "all")
    assert sorted((b["branch_id"], b["status"], b["error"]) for b in payload(run, "parallel_branch_completed")) == [
        ("p", "completed", None), ("q", "completed", None)]
    [conflict] = payload(run, "parallel_merge_conflict")
    assert (conflict["variable"], conflict["branches"]) == ("v", ["p", "q"])
    [pdone] = payload(run, "parallel_completed")
    assert (pdone["succeeded"], pdone["failed"], pdone["canceled"], pdone["winner"]) == (2, 0, 0, None)
    frames = {e["frame"] for e in payload(run, "step_started")}
    assert {"each[0]", "each[2]", "fan/p", "fan/q"} <= frames


async def test_validation_verification_log_notify_audit_and_template_warning() -> None:
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "next_node": "v", "steps": [
            {"step_id": "l", "action": "log", "level": "WARNING", "message": "hello {{missing_var}}"},
            {"step_id": "n", "action": "notify", "channel": "email", "recipients": ["ops@example.com"],
             "subject": "S", "message": "M", "metadata": {"k": 1}}],
              "validations": [{"id": "ok", "condition": "1 > 2", "on_failure": "throw_exception", "message": "nope"}],
              "error_handlers": [{"error_type": "validation_failed", "action": "ignore"}]},
        "v": {"type": "verification", "next_node": "p", "checks": [
            {"id": "c1", "condition": "1 > 2", "on_fail": "warn", "message": "soft"}]},
        "p": {"type": "processing", "next_node": "z", "operations": [{"action": "log", "message": "in p"}]},
        "z": {"type": "terminate", "final_audit_log": {"who": "{{run_id}}"}}})))
    logs = payload(run, "log")
    assert [(x["level"], x["message"], x["node_id"], x["frame"]) for x in logs] == [
        ("WARNING", "hello ", "a", "-"), ("INFO", "in p", "p", "-")]
    [note] = payload(run, "notification_requested")
    assert (note["channel"], note["recipients"], note["subject"], note["message"], note["metadata"]) == \
        ("email", ["ops@example.com"], "S", "M", {"k": 1})
    [warning] = payload(run, "template_warning")
    assert warning["variable"] == "missing_var"
    assert warning["location"]["node_id"] == "a"
    assert warning["location"]["step_id"] == "l"
    [vf] = payload(run, "validation_failed")
    assert (vf["validation_id"], vf["message"], vf["on_failure"]) == ("ok", "nope", "throw_exception")
    [vw] = payload(run, "verification_warning")
    assert (vw["check_id"], vw["message"]) == ("c1", "soft")
    [audit] = payload(run, "audit_log")
    assert audit["entry"] == {"who": "run-1"}
    assert audit["node_id"] == "z"


async def test_approval_request_pause_and_decision_payloads() -> None:
    run = checked(await run_doc(doc({
        "ask": {"type": "human_approval", "description": "Pay?", "prompt": "Pay {{n}}?", "decision_type":
                "approve_reject", "context_data": {"n": "{{n}}"}, "timeout_ms": 60000, "timeout_action": "auto_reject",
                "approval_level": "manager", "escalation_contact": "boss@example.com",
                "on_approve": "yes", "on_reject": "no"},
        "yes": {"type": "terminate", "outputs": {"r": "yes"}},
        "no": {"type": "terminate", "outputs": {"r": "no"}}}, start="ask",
        variables_schema={"n": {"type": "integer", "default": 3}})))
    [asked] = payload(run, "approval_requested")
    assert (asked["node_name"], asked["decision_type"], asked["prompt"], asked["context_data"],
            asked["timeout_action"], asked["approval_level"], asked["escalation_contact"], asked["suspends_run"]) == \
        ("Pay?", "approve_reject", "Pay 3?", {"n": 3}, "auto_reject", "manager", "boss@example.com", True)
    assert isinstance(asked["expires_at"], str)
    assert asked["expires_at"].endswith("Z")
    [paused] = payload(run, "node_paused")
    assert (paused["reason"], paused["wait_id"], paused["node_id"]) == ("awaiting_approval", asked["approval_id"],
                                                                         "ask")
    await run.resume(wait_id=asked["approval_id"], decision="approved", decided_by="user:ann", comment="fine")
    checked(run)
    [decided] = payload(run, "approval_decision_received")
    assert (decided["approval_id"], decided["status"], decided["decision"], decided["decided_by"],
            decided["comment"], decided["source"], decided["routed_to"], decided["resumes_run"]) == \
        (asked["approval_id"], "approved", "approved", "user:ann", "fine", "human", "yes", True)
    assert run.outcome == {"status": "completed", "outputs": {"r": "yes"}}


async def test_run_suspended_when_the_last_executing_frame_stops() -> None:
    """§7.1: a pause emitted while another frame still executes carries ``suspends_run: false``; the run then
    emits ``run_suspended {status, waiting_on}`` once no frame executes."""
    run = checked(await run_doc(doc({
        "fan": {"type": "parallel", "next_node": "z", "branches": [
            {"branch_id": "x", "start_node": "ax"}, {"branch_id": "y", "start_node": "ay"}]},
        "ax": {"type": "human_approval", "on_approve": "z", "on_reject": "z"},
        "ay": {"type": "human_approval", "on_approve": "z", "on_reject": "z"},
        "z": {"type": "terminate"}}, start="fan")))
    asked = payload(run, "approval_requested")
    assert len(asked) == 2
    assert any(a["suspends_run"] is False for a in asked)
    [suspended] = payload(run, "run_suspended")
    assert suspended["status"] == "waiting_approval"
    assert sorted(w["id"] for w in suspended["waiting_on"]) == sorted(a["approval_id"] for a in asked)
    for wait in suspended["waiting_on"]:
        assert wait["kind"] == "approval"
        assert wait["node_id"] in ("ax", "ay")
        assert {"step_id", "expires_at"} <= set(wait)
    assert run.types().index("run_suspended") > max(i for i, t in enumerate(run.types()) if t == "node_paused")


async def test_dry_run_mock_and_override_events() -> None:
    dry = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "WEB", "next_node": "ask", "steps": [{"step_id": "s", "action": "open"}]},
        "ask": {"type": "human_approval", "on_approve": "llm", "on_reject": "z"},
        "llm": {"type": "llm_action", "prompt": "hi", "next_node": "z"},
        "z": {"type": "terminate"}}, global_config={"execution_mode": "dry_run"})))
    skipped = payload(dry, "dry_run_step_skipped")
    assert [(s["action"], s["binding_kind"], s["channel"]) for s in skipped] == [("open", "channel", "web"),
                                                                                 ("chat", "llm", None)]
    [auto] = payload(dry, "approval_auto_resolved")
    assert (auto["decision"], auto["payload"], auto["routed_to"]) == ("approved", None, "llm")
    assert not dry.of("approval_requested")
    mocked = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "WEB", "next_node": "z", "steps": [{"step_id": "s", "action": "open"}]},
        "z": {"type": "terminate"}}, global_config={"mock_external_calls": True})))
    [mock] = payload(mocked, "step_mock_applied")
    assert (mock["action"], mock["binding_kind"], mock["channel"], mock["step_id"]) == ("open", "channel", "web", "s")
    over = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "WEB", "next_node": "z", "steps": [{"step_id": "s", "action": "open",
                                                                               "output_variable": "o"}]},
        "z": {"type": "terminate", "outputs": {"o": "{{o}}"}}},
        global_config={"test_data_overrides": {"a.s": {"page": 1}}})))
    [applied] = payload(over, "step_test_override_applied")
    assert (applied["override_key"], applied["step_id"]) == ("a.s", "s")
    assert over.outcome == {"status": "completed", "outputs": {"o": {"page": 1}}}


async def test_sla_breached_payload_and_fail_raises_sla_breached() -> None:
    async def slow(request: Any) -> Any:
        await asyncio.sleep(0.05)
        return "ok"

    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [{"step_id": "s", "action": "slow"}],
              "sla": {"max_duration_ms": 1, "on_breach": "fail"}},
        "z": {"type": "terminate"}}), dispatcher=ScriptedDispatcher({"slow": [slow]})))
    [breach] = payload(run, "sla_breached")
    assert (breach["limit_ms"], breach["on_breach"], breach["escalation_handler"], breach["enforced"]) == \
        (1, "fail", None, False)
    assert breach["elapsed_ms"] > 1
    assert run.outcome is not None
    assert (run.outcome["error"]["code"], run.outcome["error"]["retryable"]) == ("sla_breached", False)


# --- §7.16: codes and retryable defaults the interpreter produces --------------------------------------------------


@pytest.mark.parametrize(("nodes", "code", "retryable"), [
    ({"a": {"type": "sequence", "agent": "API", "steps": [{"step_id": "s", "action": "nobody_does_this"}]}},
     "no_executor", True),
    ({"a": {"type": "logic", "rules": [{"condition": "1 > 2", "next_node": "a"}]}}, "logic_no_route", False),
    ({"a": {"type": "sequence", "steps": [{"step_id": "s", "action": "calculate", "expression": "1 / 0"}]}},
     "expression_error", False),
    ({"a": {"type": "loop", "iterator": "'abc'", "iterator_variable": "x", "body_node": "b"},
      "b": {"type": "sequence", "steps": [{"step_id": "s", "action": "log", "message": "x"}]}},
     "loop_iterator_invalid", False),
    ({"a": {"type": "loop", "iterator": "[0]", "iterator_variable": "x", "body_node": "b"},
      "b": {"type": "sequence", "steps": [{"step_id": "s", "action": "calculate", "expression": "1 / x"}]}},
     "loop_iteration_failed", False),
    ({"a": {"type": "parallel", "branches": [{"branch_id": "p", "start_node": "b"}]},
      "b": {"type": "sequence", "steps": [{"step_id": "s", "action": "calculate", "expression": "1 / 0"}]}},
     "parallel_all_failed", False),
    ({"a": {"type": "parallel", "branch_failure": "fail", "branches": [{"branch_id": "p", "start_node": "b"}]},
      "b": {"type": "sequence", "steps": [{"step_id": "s", "action": "calculate", "expression": "1 / 0"}]}},
     "parallel_branch_failed", False),
    ({"a": {"type": "sequence", "steps": [{"step_id": "s", "action": "log", "message": "x"}],
            "validations": [{"id": "v", "condition": "1 > 2", "on_failure": "fail_workflow"}]}},
     "validation_failed", False),
    ({"a": {"type": "verification", "checks": [{"id": "c", "condition": "1 > 2", "on_fail": "fail_workflow"}]}},
     "verification_failed", False),
    ({"a": {"type": "sequence", "steps": [{"step_id": "s", "action": "parse_json", "source": "{bad"}]}},
     "operation_failed", False),
])
async def test_error_codes_and_retryable_defaults(nodes: dict[str, Any], code: str, retryable: bool) -> None:
    run = checked(await run_doc(doc(nodes)))
    assert run.outcome is not None, run.final
    assert run.outcome["status"] == "failed", run.final
    error = run.outcome["error"]
    check_error(error)
    assert (error["code"], error["retryable"], error["node_id"]) == (code, retryable, "a")
    if code in ("loop_iteration_failed", "parallel_branch_failed"):
        assert error["cause"]["code"] == "expression_error"


@pytest.mark.parametrize(("agent_error", "code", "retryable"), [
    (err("agent_error", retryable=True, type="Busy"), "agent_error", True),
    (err("agent_error"), "agent_error", False),
    (err("agent_http_422", http_status=422), "agent_http_422", False),
    (err("agent_protocol_error"), "agent_protocol_error", False),
])
async def test_step_errors_keep_their_code_and_retryable_in_run_failed(agent_error: ErrorObject, code: str,
                                                                        retryable: bool) -> None:
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "steps": [{"step_id": "s", "action": "act"}]}}),
        dispatcher=ScriptedDispatcher({"act": [agent_error]})))
    assert run.outcome is not None
    error = run.outcome["error"]
    assert (error["code"], error["retryable"], error["node_id"], error["step_id"], error["frame"],
            error["attempt"]) == (code, retryable, "a", "s", "-", 1)


async def test_screenshot_requested_and_artifact_created_payloads() -> None:
    """§4.10: no agent could take the failure screenshot → ``screenshot_requested {reason, error}``; §4.12: a
    screenshot a step result names → ``artifact_created {artifact_id, kind, name, uri, mime_type, size_bytes,
    stored}``."""
    agent = ScriptedDispatcher({"snap": [{"screenshot": "file:///tmp/page.png"}], "boom": [err("agent_error")]})
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "WEB", "next_node": "b", "steps": [{"step_id": "s", "action": "snap"}]},
        "b": {"type": "sequence", "agent": "WEB", "next_node": "z", "steps": [{"step_id": "t", "action": "boom"}],
              "error_handlers": [{"action": "screenshot_and_fail"}]},
        "z": {"type": "terminate"}}), dispatcher=agent))
    [artifact] = payload(run, "artifact_created")
    assert (artifact["node_id"], artifact["step_id"], artifact["kind"], artifact["uri"], artifact["stored"]) == \
        ("a", "s", "screenshot", "file:///tmp/page.png", False)
    assert isinstance(artifact["artifact_id"], str)
    assert artifact["artifact_id"]
    [shot] = payload(run, "screenshot_requested")
    assert (shot["reason"], shot["node_id"], shot["step_id"], shot["error"]["code"]) == \
        ("screenshot_and_fail", "b", "t", "agent_error")
    assert run.outcome is not None
    assert run.outcome["error"]["code"] == "agent_error"


async def test_retry_node_runs_completed_steps_again_under_new_identities() -> None:
    """§4.10: ``retry_node`` re-runs the node as a new visit — completed steps run again under new identities (frame
    ``#2``, a new Idempotency-Key), they are not replayed (§7.4)."""
    agent = ScriptedDispatcher({"fetch": [{"v": 1}], "flaky": [err("agent_error"), {"ok": True}]})
    run = checked(await run_doc(doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [
            {"step_id": "f", "action": "fetch", "output_variable": "got"}, {"step_id": "g", "action": "flaky"}],
              "error_handlers": [{"action": "retry_node", "max_retries": 1, "delay_ms": 0}]},
        "z": {"type": "terminate", "outputs": {"got": "{{got}}"}}}), dispatcher=agent))
    assert run.outcome == {"status": "completed", "outputs": {"got": {"v": 1}}}
    assert not run.of("step_replayed")
    fetches = [s for s in payload(run, "step_started") if s["step_id"] == "f"]
    assert [(s["frame"], s["idempotency_key"]) for s in fetches] == [
        ("-", "lo1:run-1:a:f:-:1"), ("#2", "lo1:run-1:a:f:#2:1")]
    assert [(n["node_id"], n["visit"]) for n in payload(run, "node_started")] == [("a", 1), ("a", 2), ("z", 1)]


# --- §7.15: payloads are redacted and bounded as they are appended ---------------------------------------------------


@pytest.mark.parametrize(("key", "redacted"), [
    ("password", True), ("PassWd", True), ("client_secret", True), ("api-key", True), ("Authorization", True),
    ("cookie", True), ("private_key", True), ("credentials", True), ("token", True), ("access_token", True),
    ("refreshToken", True), ("csrftoken", True), ("prompt_tokens", False), ("total_tokens", False),
    ("author", False), ("oauth_state", False), ("tokens_left", False), ("token_count", False),
])
def test_sensitive_keys_of_7_15(key: str, redacted: bool) -> None:
    from ckp_core.redaction import is_sensitive_key

    assert is_sensitive_key(key) is redacted


async def test_run_writer_redacts_masks_and_bounds_every_payload() -> None:
    from ckp_core.events import ANONYMOUS, Log, StepStarted
    from ckp_core.eventstore import AggregateHead, MemoryEventStore
    from ckp_core.redaction import Redactor
    from langorch_runtime.executor import RunWriter

    store = MemoryEventStore()
    writer = RunWriter(store, "run-9", AggregateHead(0, 0), Redactor(extra_keys=["iban"], values=["s3cr3t-value"]),
                       ANONYMOUS, None)
    await writer.emit(StepStarted(node_id="a", step_id="s", attempt=1, action="post", binding_kind="agent_http",
                                  idempotency_key="lo1:run-9:a:s:-:1", params={
                                      "password": "p", "nested": {"refreshToken": "t", "iban": "DE00"},
                                      "note": "uses s3cr3t-value here"}))
    [stored] = await store.read("run", "run-9")
    params = stored.envelope.data["params"]
    assert params["password"] == "***REDACTED***"
    assert params["nested"] == {"refreshToken": "***REDACTED***", "iban": "***REDACTED***"}
    assert params["note"] == "uses ***REDACTED*** here"
    assert stored.envelope.data["action"] == "post"
    await writer.emit(Log(node_id="a", level="INFO", message="y" * (64 * 1024 + 1)))
    stored_log = (await store.read("run", "run-9"))[1].envelope
    assert (stored_log.seq, stored_log.data["level"]) == (2, "INFO")
    assert stored_log.data["message"]["_truncated"] is True
    assert stored_log.data["message"]["bytes"] == 64 * 1024 + 3  # the JSON string, quotes included
    assert len(stored_log.data["message"]["sha256"]) == 64
