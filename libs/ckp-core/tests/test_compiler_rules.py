"""One small failing document per validator rule of ckp.md §6.4: each asserts its code, severity and JSON path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from ckp_core.compiler import compile_document
from ckp_core.ir import SubflowRefIR

pytestmark = pytest.mark.unit

END: dict[str, Any] = {"type": "terminate"}
LOG: dict[str, Any] = {"step_id": "s", "action": "log", "message": "x"}
N = "/workflow_graph/nodes"


def doc(nodes: dict[str, Any], start: str = "a", **extra: Any) -> dict[str, Any]:
    return {"procedure_id": "p", "version": "1", **extra, "workflow_graph": {"start_node": start, "nodes": nodes}}


def seq(*steps: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "sequence", "steps": list(steps), **kw}


def one(node: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Node ``a`` followed by terminate ``z``."""
    if node.get("type") not in ("logic", "human_approval", "terminate") and "next_node" not in node:
        node = {**node, "next_node": "z"}
    return doc({"a": node, "z": END}, **extra)


def approval(**kw: Any) -> dict[str, Any]:
    return one({"type": "human_approval", "on_approve": "z", "on_reject": "z", **kw})


def trig(**kw: Any) -> dict[str, Any]:
    return one(seq(LOG), trigger=kw)


# (case id, document, severity, code, path)
CASES: list[tuple[str, Any, str, str, str]] = [
    ("not_an_object", [1, 2], "error", "invalid_document", ""),
    ("dialect_nodes_list", {"procedure_id": "p", "version": "1", "workflow_graph": {"nodes": []}}, "error",
     "unsupported_dialect", "/workflow_graph/nodes"),
    ("dialect_top_level_nodes", {"procedure_id": "p", "version": "1", "nodes": []}, "error", "unsupported_dialect",
     "/nodes"),
    ("dialect_entry", {"procedure_id": "p", "version": "1", "entry": "a"}, "error", "unsupported_dialect", "/entry"),
    ("missing_version", {"procedure_id": "p", "workflow_graph": {"start_node": "z", "nodes": {"z": END}}}, "error",
     "missing_field", "/version"),
    ("missing_loop_body", one({"type": "loop", "iterator": "xs", "iterator_variable": "x"}), "error",
     "missing_field", f"{N}/a/body_node"),
    ("steps_not_list", one({"type": "sequence", "steps": {}}), "error", "invalid_type", f"{N}/a/steps"),
    ("negative_timeout", one(seq({**LOG, "timeout_ms": -1})), "error", "invalid_value", f"{N}/a/steps/0/timeout_ms"),
    ("bad_status_is_warning", {**one(seq(LOG)), "status": "live"}, "warning", "invalid_value", "/status"),
    ("bad_wait_strategy", doc({"a": {"type": "parallel", "branches": [{"branch_id": "b", "start_node": "z"}],
                                     "wait_strategy": "most"}, "z": END}), "error", "invalid_value",
     f"{N}/a/wait_strategy"),
    ("branch_failure_retry", doc({"a": {"type": "parallel", "branches": [{"branch_id": "b", "start_node": "z"}],
                                        "branch_failure": "retry"}, "z": END}), "error", "invalid_value",
     f"{N}/a/branch_failure"),
    ("bad_node_id", doc({"a b": END}, start="a b"), "error", "invalid_identifier", f"{N}/a b"),
    ("bad_output_variable", one(seq({**LOG, "output_variable": "1x"})), "error", "invalid_identifier",
     f"{N}/a/steps/0/output_variable"),
    ("unknown_node_field", one(seq(LOG, inputs={})), "warning", "unknown_field", f"{N}/a/inputs"),
    ("unknown_global_field", one(seq(LOG), global_config={"max_concurrent": 3}), "warning", "unknown_field",
     "/global_config/max_concurrent"),
    ("alias_first", doc({"a": {"type": "parallel", "branches": [{"branch_id": "b", "start_node": "z"}],
                               "wait_strategy": "first"}, "z": END}), "info", "alias_normalised",
     f"{N}/a/wait_strategy"),
    ("no_effect", one(seq(LOG), global_config={"checkpoint_storage": "db"}), "info", "field_has_no_effect",
     "/global_config/checkpoint_storage"),
    ("unknown_start", doc({"z": END}, start="nope"), "error", "unknown_start_node", "/workflow_graph/start_node"),
    ("unknown_type", doc({"a": {"type": "human_in_the_loop"}}), "error", "unknown_node_type", f"{N}/a/type"),
    ("target_next", one(seq(LOG, next_node="nope")), "error", "unknown_target", f"{N}/a/next_node"),
    ("target_rule", one({"type": "logic", "rules": [{"condition": "true", "next_node": "nope"}],
                         "default_next_node": "z"}), "error", "unknown_target", f"{N}/a/rules/0/next_node"),
    ("target_default", one({"type": "logic", "default_next_node": "nope"}), "error", "unknown_target",
     f"{N}/a/default_next_node"),
    ("target_body", one({"type": "loop", "iterator": "[1]", "iterator_variable": "x", "body_node": "nope"}),
     "error", "unknown_target", f"{N}/a/body_node"),
    ("target_branch", one({"type": "parallel", "branches": [{"branch_id": "b", "start_node": "nope"}]}), "error",
     "unknown_target", f"{N}/a/branches/0/start_node"),
    ("target_approve", approval(on_approve="nope"), "error", "unknown_target", f"{N}/a/on_approve"),
    ("target_timeout", approval(on_timeout="nope"), "error", "unknown_target", f"{N}/a/on_timeout"),
    ("target_option", approval(decision_type="select_option", options=["x"], option_routes={"x": "nope"}), "error",
     "unknown_target", f"{N}/a/option_routes/x"),
    ("target_fallback", one(seq(LOG, error_handlers=[{"action": "ignore", "fallback_node": "nope"}])), "error",
     "unknown_target", f"{N}/a/error_handlers/0/fallback_node"),
    ("target_escalation", one(seq(LOG, sla={"max_duration_ms": 5, "on_breach": "escalate",
                                            "escalation_handler": "nope"})), "error", "unknown_target",
     f"{N}/a/sla/escalation_handler"),
    ("target_on_failure", one(seq(LOG), global_config={"on_failure": "nope"}), "error", "unknown_target",
     "/global_config/on_failure"),
    ("target_llm_branch", one({"type": "llm_action", "prompt": "p", "orchestration_mode": True,
                               "branches": ["nope"]}), "error", "unknown_target", f"{N}/a/branches/0"),
    ("next_on_logic", one({"type": "logic", "default_next_node": "z", "next_node": "z"}), "error",
     "edge_not_allowed", f"{N}/a/next_node"),
    ("next_on_approval", approval(next_node="z"), "error", "edge_not_allowed", f"{N}/a/next_node"),
    ("next_on_terminate", doc({"a": {"type": "terminate", "next_node": "a"}}), "error", "edge_not_allowed",
     f"{N}/a/next_node"),
    ("handlers_on_terminate", doc({"a": {"type": "terminate", "error_handlers": [{"action": "fail"}]}}), "error",
     "edge_not_allowed", f"{N}/a/error_handlers"),
    ("sla_route_on_terminate", doc({"a": {"type": "terminate", "sla": {"max_duration_ms": 1,
                                                                       "escalation_handler": "a"}}}),
     "error", "edge_not_allowed", f"{N}/a/sla/escalation_handler"),
    ("unreachable", doc({"a": END, "orphan": END}), "warning", "unreachable_node", f"{N}/orphan"),
    ("empty_logic", one({"type": "logic"}), "error", "empty_logic", f"{N}/a"),
    ("no_default", one({"type": "logic", "rules": [{"condition": "true", "next_node": "z"}]}), "warning",
     "logic_without_default", f"{N}/a"),
    ("dup_step", one(seq(LOG, LOG)), "error", "duplicate_id", f"{N}/a/steps/1/step_id"),
    ("dup_branch", one({"type": "parallel", "branches": [{"branch_id": "b", "start_node": "z"},
                                                         {"branch_id": "b", "start_node": "z"}]}), "error",
     "duplicate_id", f"{N}/a/branches/1/branch_id"),
    ("dup_check", one({"type": "verification", "checks": [{"id": "c", "condition": "true"},
                                                          {"id": "c", "condition": "true"}]}), "error",
     "duplicate_id", f"{N}/a/checks/1/id"),
    ("dup_validation", one(seq(LOG, validations=[{"id": "v", "condition": "true"}, {"id": "v", "condition": "1"}])),
     "error", "duplicate_id", f"{N}/a/validations/1/id"),
    ("empty_parallel", one({"type": "parallel", "branches": []}), "error", "empty_parallel", f"{N}/a/branches"),
    ("orchestration", one({"type": "llm_action", "prompt": "p", "orchestration_mode": True}), "error",
     "orchestration_without_branches", f"{N}/a/orchestration_mode"),
    ("missing_reject", one({"type": "human_approval", "on_approve": "z"}), "error", "approval_missing_route",
     f"{N}/a/on_reject"),
    ("select_unrouted", one({"type": "human_approval", "decision_type": "select_option", "options": ["x", "y"],
                             "option_routes": {"x": "z"}}), "error", "approval_missing_route", f"{N}/a/on_approve"),
    ("option_route_key", approval(decision_type="select_option", options=["x"], option_routes={"y": "z"}), "error",
     "invalid_option_route", f"{N}/a/option_routes/y"),
    ("timeout_unrouted", approval(timeout_ms=10, timeout_action="escalate"), "error", "approval_timeout_unrouted",
     f"{N}/a/timeout_ms"),
    ("timeout_action_alone", approval(timeout_action="auto_reject"), "warning", "timeout_action_without_timeout",
     f"{N}/a/timeout_action"),
    ("sla_escalate", one(seq(LOG, sla={"max_duration_ms": 5, "on_breach": "escalate"})), "error",
     "sla_escalate_without_handler", f"{N}/a/sla/on_breach"),
    ("sla_enforce_warn", one(seq(LOG, sla={"max_duration_ms": 5, "enforce": True})), "warning",
     "sla_enforce_with_warn", f"{N}/a/sla/enforce"),
    ("metric_name", one(seq(LOG, telemetry={"custom_metrics": ["Bad-Name"]})), "warning", "invalid_custom_metric",
     f"{N}/a/telemetry/custom_metrics/0"),
    ("subflow_self", one({"type": "subflow", "procedure_id": "p"}), "error", "subflow_recursion",
     f"{N}/a/procedure_id"),
    ("unknown_action", one(seq({"step_id": "s", "action": "navigate"})), "error", "unknown_action",
     f"{N}/a/steps/0/action"),
    ("unknown_operation", one({"type": "processing", "operations": [{"action": "navigate"}]}), "error",
     "unknown_operation", f"{N}/a/operations/0/action"),
    ("restore_checkpoint", one(seq({"step_id": "s", "action": "restore_checkpoint"}, agent="WEB")), "error",
     "unsupported_action", f"{N}/a/steps/0/action"),
    ("screen_check_internal", one(seq(LOG, validations=[{"id": "v", "check": "element_exists",
                                                         "expected_values": ["#x"]}])), "error",
     "channel_required", f"{N}/a/validations/0/check"),
    ("param_conflict", one(seq({**LOG, "params": {"message": "y"}})), "warning", "param_conflict",
     f"{N}/a/steps/0/params/message"),
    ("transform_type", one({"type": "transform", "transformations": [{"type": "explode", "output_variable": "o"}]}),
     "error", "unknown_transform_type", f"{N}/a/transformations/0/type"),
    ("output_mapping", one(seq({"step_id": "s", "action": "fetch", "output_mapping": {"v": "yaml:x"}},
                               agent="API")), "error", "invalid_output_mapping", f"{N}/a/steps/0/output_mapping/v"),
    ("retry_zero", one(seq(LOG, error_handlers=[{"action": "retry", "max_retries": 0}])), "warning",
     "retry_without_retries", f"{N}/a/error_handlers/0"),
    ("shadowed", one(seq(LOG, error_handlers=[{"action": "fail"}, {"error_type": "x", "action": "retry"}])),
     "warning", "shadowed_error_handler", f"{N}/a/error_handlers/1"),
    ("expression_syntax", one({"type": "logic", "rules": [{"condition": "x >", "next_node": "z"}],
                               "default_next_node": "z"}, variables_schema={"x": {}}), "error",
     "expression_syntax_error", f"{N}/a/rules/0/condition"),
    ("aggregate_syntax", one({"type": "transform", "transformations": [
        {"type": "aggregate", "source_variable": "xs", "expression": "median(x)", "output_variable": "o"}]},
        variables_schema={"xs": {}}), "error", "expression_syntax_error", f"{N}/a/transformations/0/expression"),
    ("template_syntax", one(seq({**LOG, "message": "{{ x + }}"})), "error", "template_syntax_error",
     f"{N}/a/steps/0/message"),
    ("unknown_function", one({"type": "verification", "checks": [{"id": "c", "condition": "frob(1)"}]}), "error",
     "unknown_function", f"{N}/a/checks/0/condition"),
    ("arity", one({"type": "verification", "checks": [{"id": "c", "condition": "len(1, 2)"}]}), "error",
     "function_arity", f"{N}/a/checks/0/condition"),
    ("regex_literal", one({"type": "verification", "checks": [{"id": "c", "condition": "'a' matches '('"}]}),
     "error", "invalid_regex", f"{N}/a/checks/0/condition"),
    ("regex_operation", one({"type": "processing", "operations": [
        {"action": "extract_regex", "source": "a", "pattern": "(?<=x)"}]}), "error", "invalid_regex",
     f"{N}/a/operations/0/pattern"),
    ("regex_variable", one(seq(LOG), variables_schema={"v": {"type": "string", "validation": {"regex": "["}}}),
     "error", "invalid_regex", "/variables_schema/v/validation/regex"),
    ("json_schema", one({"type": "processing", "operations": [
        {"action": "validate_schema", "value": 1, "schema": {"type": "nonsense"}}]}), "error", "invalid_json_schema",
     f"{N}/a/operations/0/schema"),
    ("approval_input_schema", approval(decision_type="provide_input", input_schema=["x"]), "error",
     "invalid_json_schema", f"{N}/a/input_schema"),
    ("undeclared", one(seq({**LOG, "message": "{{ghost}}"})), "warning", "undeclared_variable",
     f"{N}/a/steps/0/message"),
    ("reserved_declared", one(seq(LOG), variables_schema={"run_id": {}}), "error", "reserved_variable_name",
     "/variables_schema/run_id"),
    ("reserved_written", one(seq({**LOG, "output_variable": "now"})), "error", "reserved_variable_name",
     f"{N}/a/steps/0/output_variable"),
    ("secret_in_log", one(seq({**LOG, "message": "{{secrets.pw}}"})), "error", "secret_not_allowed",
     f"{N}/a/steps/0/message"),
    ("secret_in_condition", one({"type": "verification", "checks": [{"id": "c", "condition": "secrets.pw == 1"}]}),
     "error", "secret_not_allowed", f"{N}/a/checks/0/condition"),
    ("secret_alias", one(seq({"step_id": "s", "action": "login", "password": "{{secrets.pw}}"}, agent="WEB")),
     "warning", "undeclared_secret_alias", f"{N}/a/steps/0/password"),
    ("bare_reference", one({"type": "subflow", "procedure_id": "child", "input_mapping": {"id": "order.id"}},
                           variables_schema={"order": {"type": "object"}}), "info", "bare_reference",
     f"{N}/a/input_mapping/id"),
    ("invalid_default", one(seq(LOG), variables_schema={"n": {"type": "number", "default": "abc"}}), "error",
     "invalid_default", "/variables_schema/n/default"),
    ("trigger_type", trig(type="cron"), "error", "invalid_trigger_type", "/trigger/type"),
    ("missing_schedule", trig(type="scheduled"), "error", "missing_schedule", "/trigger/schedule"),
    ("invalid_cron", trig(type="scheduled", schedule="61 * * * *"), "error", "invalid_cron", "/trigger/schedule"),
    ("six_field_cron", trig(type="scheduled", schedule="0 0 9 * * MON"), "error", "invalid_cron", "/trigger/schedule"),
    ("invalid_timezone", trig(type="scheduled", schedule="0 9 * * MON-FRI", timezone="Mars/Olympus"), "error",
     "invalid_timezone", "/trigger/timezone"),
    ("webhook_secret", trig(type="webhook"), "error", "missing_webhook_secret", "/trigger/webhook_secret"),
    ("body_scheme", trig(type="webhook", webhook_secret="s", signature_scheme="body"), "error",
     "body_signature_requires_dedupe", "/trigger/signature_scheme"),
    ("event_source", trig(type="event"), "error", "missing_event_source", "/trigger/event_source"),
    ("event_source_kind", trig(type="event", event_source="kafka://orders"), "error", "unsupported_event_source",
     "/trigger/event_source"),
    ("event_filter_type", trig(type="event", event_source="nats://lo.ext.orders", event_filter={"a": 1}), "error",
     "invalid_type", "/trigger/event_filter"),
    ("file_watch", trig(type="file_watch"), "error", "missing_file_watch_path", "/trigger/file_watch_path"),
    ("ignored_field", trig(type="manual", schedule="* * * * *"), "warning", "ignored_trigger_field",
     "/trigger/schedule"),
    ("ignored_nested", trig(type="webhook", webhook_secret="s", webhook_config={"endpoint": "/x"}), "warning",
     "ignored_trigger_field", "/trigger/webhook_config/endpoint"),
    ("dead_end", doc({"a": seq(LOG, next_node="b"), "b": seq(LOG, next_node="a")}), "warning", "dead_end", f"{N}/a"),
]

# Every rule code of ckp.md §6.4 (plus dead_end, this implementation's addition); each needs a case above.
RULE_CODES = {
    "invalid_document", "unsupported_dialect", "missing_field", "invalid_type", "invalid_value", "invalid_identifier",
    "unknown_field", "alias_normalised", "field_has_no_effect", "unknown_start_node", "unknown_node_type",
    "unknown_target", "edge_not_allowed", "unreachable_node", "empty_logic", "logic_without_default", "duplicate_id",
    "empty_parallel", "orchestration_without_branches", "approval_missing_route", "invalid_option_route",
    "approval_timeout_unrouted", "timeout_action_without_timeout", "sla_escalate_without_handler",
    "sla_enforce_with_warn", "invalid_custom_metric", "subflow_recursion", "subflow_not_found", "unknown_action",
    "unknown_operation", "unsupported_action", "channel_required", "param_conflict", "unknown_transform_type",
    "invalid_output_mapping", "retry_without_retries", "shadowed_error_handler", "expression_syntax_error",
    "template_syntax_error", "unknown_function", "function_arity", "invalid_regex", "invalid_json_schema",
    "undeclared_variable", "reserved_variable_name", "secret_not_allowed", "undeclared_secret_alias",
    "bare_reference", "invalid_default", "invalid_trigger_type", "missing_schedule", "invalid_cron",
    "invalid_timezone", "missing_webhook_secret", "body_signature_requires_dedupe", "missing_event_source",
    "unsupported_event_source", "missing_file_watch_path", "ignored_trigger_field", "dead_end",
}


@pytest.mark.parametrize(("document", "severity", "code", "path"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule_reports_code_severity_and_path(document: Any, severity: str, code: str, path: str) -> None:
    result = compile_document(document)
    found = [(d.severity, d.code, d.path) for d in result.diagnostics]
    assert (severity, code, path) in found, found
    assert (result.ir is None) == any(d.severity == "error" for d in result.diagnostics)


def test_every_rule_has_a_failing_document() -> None:
    covered = {c[3] for c in CASES} | {"subflow_not_found"}
    assert covered >= RULE_CODES


class Store:
    """A procedure lookup over a dict of ``procedure_id -> subflow targets``."""

    def __init__(self, refs: dict[str, list[str]]) -> None:
        self.refs = refs

    def __call__(self, procedure_id: str, version: str | None) -> list[SubflowRefIR] | None:
        if procedure_id not in self.refs:
            return None
        return [SubflowRefIR(node_id="n", procedure_id=t) for t in self.refs[procedure_id]]


def test_subflow_not_found_is_a_warning_through_the_lookup() -> None:
    result = compile_document(one({"type": "subflow", "procedure_id": "child"}), Store({}))
    assert ("warning", "subflow_not_found", f"{N}/a/procedure_id") in [
        (d.severity, d.code, d.path) for d in result.diagnostics]
    assert result.ir is not None


def test_subflow_recursion_through_the_store_names_the_chain() -> None:
    result = compile_document(one({"type": "subflow", "procedure_id": "b"}), Store({"b": ["c"], "c": ["p"]}))
    [diag] = [d for d in result.diagnostics if d.code == "subflow_recursion"]
    assert diag.path == f"{N}/a/procedure_id"
    assert "p -> b -> c -> p" in diag.message
    assert result.ir is None


def test_unknown_node_type_is_the_only_diagnostic_of_that_node_and_skips_reachability() -> None:
    result = compile_document(doc({"a": {"type": "hil", "next_node": "nope", "bogus": 1}, "orphan": END}))
    assert [d.code for d in result.diagnostics] == ["unknown_node_type"]


def test_comment_keys_are_dropped_without_diagnostics() -> None:
    document = one(seq({**LOG, "_note": "x"}, _comment="y"), _about="z")
    result = compile_document(document)
    assert result.diagnostics == []
    assert result.ir is not None


def test_diagnostics_are_sorted_by_path_then_code() -> None:
    result = compile_document(doc({"b": seq(LOG, next_node="x1"), "a": seq(LOG, next_node="x2")}))
    keys = [(d.path, d.code) for d in result.diagnostics]
    assert keys == sorted(keys)


def test_integers_beyond_a_double_are_diagnosed_not_a_crash() -> None:
    """An integer too large for a float (JSON allows any size) is a diagnostic with its path, never an exception."""
    huge = 10**400
    result = compile_document(doc({"a": {"type": "sequence", "next_node": "z", "steps": [
        {"step_id": "s", "action": "log", "message": "hi"}], "telemetry": {"custom_metrics": {"big": huge}}},
        "z": {"type": "terminate"}}, global_config={"retry_policy": {"backoff_multiplier": huge}}))
    errors = [(d.code, d.path) for d in result.errors]
    assert ("invalid_value", "/global_config/retry_policy/backoff_multiplier") in errors
    warnings = [(d.code, d.path) for d in result.diagnostics if d.severity == "warning"]
    assert ("invalid_custom_metric", "/workflow_graph/nodes/a/telemetry/custom_metrics/big") in warnings


@pytest.mark.parametrize(("source", "order"), [
    ("{{ghost_z}} {{ghost_a}} {{ghost_m}}", ["ghost_z", "ghost_a", "ghost_m"]),  # the placeholders' order
    ("{{ghost_z + ghost_a + ghost_m}}", ["ghost_a", "ghost_m", "ghost_z"]),  # one expression's: by name
])
def test_undeclared_reads_of_one_string_are_reported_in_one_order_whatever_the_hash_seed(source: str,
                                                                                          order: list[str]) -> None:
    """Several undeclared variables read at one path are reported in the same order in every process (a set's
    order depends on PYTHONHASHSEED)."""
    script = ("import json, sys; from ckp_core.compiler import compile_document; "
              "print(json.dumps([d.message for d in compile_document(json.loads(sys.argv[1])).diagnostics]))")
    document = json.dumps(one(seq({**LOG, "message": source})))
    runs = {seed: subprocess.run([sys.executable, "-c", script, document], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2", "3", "4")}
    messages = json.loads(runs["1"])
    assert [m.split("'")[1] for m in messages] == order, messages
    assert len(set(runs.values())) == 1, runs
