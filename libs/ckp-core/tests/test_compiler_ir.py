"""What the IR holds (ckp.md §6.2 normalisations, §6.5 binding, §6.6 shape): aliases resolved, defaults filled,
effective policies precomputed, and parsed trees that evaluate without parsing the source again."""

from __future__ import annotations

from typing import Any

import pytest

from ckp_core.compiler import compile_document
from ckp_core.expressions import MappingScope, evaluate
from ckp_core.expressions import parser as expression_parser
from ckp_core.ir import (
    HumanApprovalPayload,
    LogicPayload,
    ParallelPayload,
    ProcedureIR,
    SequencePayload,
    SubflowPayload,
    TerminatePayload,
    TransformPayload,
)
from ckp_core.templates import render

pytestmark = pytest.mark.unit


def compile_ok(document: dict[str, Any]) -> ProcedureIR:
    result = compile_document(document)
    assert result.ir is not None, [(d.code, d.path, d.message) for d in result.errors]
    return result.ir


def doc(nodes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"procedure_id": "p", "version": "1", **extra, "workflow_graph": {"start_node": "a", "nodes": nodes}}


def sequence_payload(ir: ProcedureIR, node: str = "a") -> SequencePayload:
    payload = ir.nodes[node].payload
    assert isinstance(payload, SequencePayload)
    return payload


def test_effective_retry_policy_layers_step_then_global_policy_then_flat_fields() -> None:
    ir = compile_ok(doc({"a": {"type": "sequence", "agent": "API", "steps": [
        {"step_id": "plain", "action": "fetch"},
        {"step_id": "enabled", "action": "fetch", "retry_on_failure": True},
        {"step_id": "own", "action": "fetch", "retry_config": {"max_attempts": 5, "multiplier": 3}},
    ]}}, global_config={"max_retries": 1, "retry_delay_ms": 200, "retry_policy": {"strategy": "fixed"}}))
    plain, enabled, own = sequence_payload(ir).steps
    assert plain.retry is None
    assert enabled.retry is not None
    assert (enabled.retry.max_retries, enabled.retry.retry_delay_ms, enabled.retry.strategy) == (1, 200, "fixed")
    assert own.retry is not None
    assert (own.retry.max_retries, own.retry.backoff_multiplier, own.retry.strategy) == (4, 3.0, "fixed")


def test_explicit_zero_retries_are_honoured_and_jitter_true_is_one() -> None:
    ir = compile_ok(doc({"a": {"type": "sequence", "agent": "API", "steps": [
        {"step_id": "s", "action": "fetch", "retry_config": {"max_retries": 0, "jitter": True}}]}}))
    retry = sequence_payload(ir).steps[0].retry
    assert retry is not None
    assert (retry.max_retries, retry.jitter) == (0, 1.0)


def test_dispatch_mode_prefers_step_then_node_then_global() -> None:
    ir = compile_ok(doc({"a": {"type": "sequence", "agent": "HYBRID", "workflow_dispatch_mode": "SYNC", "steps": [
        {"step_id": "node_level", "action": "run"},
        {"step_id": "step_level", "action": "run", "workflow_dispatch_mode": "async"}]},
    }, global_config={"workflow_dispatch_mode": "async"}))
    node_level, step_level = sequence_payload(ir).steps
    assert (node_level.dispatch_mode, step_level.dispatch_mode) == ("sync", "async")
    assert node_level.binding.plan == "channel:hybrid:run"


def test_default_step_timeout_fills_steps_without_their_own() -> None:
    ir = compile_ok(doc({"a": {"type": "sequence", "steps": [
        {"step_id": "x", "action": "log", "message": "m"},
        {"step_id": "y", "action": "log", "message": "m", "timeout_ms": 5}]}},
        global_config={"default_step_timeout_ms": 900}))
    assert [s.timeout_ms for s in sequence_payload(ir).steps] == [900, 5]


def test_operation_aliases_are_resolved_and_names_are_not_templates() -> None:
    ir = compile_ok(doc({"a": {"type": "sequence", "steps": [
        {"step_id": "l", "action": "log", "value": "hi {{who}}"},
        {"step_id": "f", "action": "format_data", "value": "x"},
        {"step_id": "v", "action": "set_variable", "variable": "cfg.retries", "value": 3}]}},
        variables_schema={"who": {"type": "string"}}))
    log, fmt, setv = sequence_payload(ir).steps
    assert log.params.source == {"message": "hi {{who}}"}
    assert fmt.action == "format_string"
    assert fmt.params.source == {"template": "x"}
    assert setv.names == {"variable": "cfg.retries"}
    assert setv.params.source == {"value": 3}


def test_parsed_trees_evaluate_after_a_json_round_trip_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    ir = compile_ok(doc({
        "a": {"type": "logic", "rules": [{"condition": "{{amount}} > 10 and region in ['eu']", "next_node": "b"}],
              "default_next_node": "b"},
        "b": {"type": "terminate", "outputs": {"total": "{{amount}}", "label": "{{region}}-{{amount * 2}}"}},
    }, variables_schema={"amount": {"type": "number"}, "region": {"type": "string"}}))
    loaded = ProcedureIR.model_validate_json(ir.model_dump_json(by_alias=True))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the runtime must not parse CKP text again")

    monkeypatch.setattr(expression_parser, "_Parser", refuse)
    scope = MappingScope({"amount": 12.5, "region": "eu"})
    logic = loaded.nodes["a"].payload
    assert isinstance(logic, LogicPayload)
    assert evaluate(logic.rules[0].condition.compiled, scope) is True
    term = loaded.nodes["b"].payload
    assert isinstance(term, TerminatePayload)
    assert render(term.outputs.compiled, scope) == {"total": 12.5, "label": "eu-25.0"}


def test_node_type_aliases_and_defaults() -> None:
    ir = compile_ok(doc({
        "a": {"type": "parallel", "branches": [{"branch_id": "x", "start_node": "c"}], "wait_strategy": "first",
              "branch_failure": "stop", "next_node": "b"},
        "c": {"type": "transform", "transformations": [{"type": "unique", "source_variable": "xs",
                                                        "output_variable": "ys"}]},
        "b": {"type": "terminate", "status": "failure"},
    }, variables_schema={"xs": {"type": "array"}}))
    par = ir.nodes["a"].payload
    assert isinstance(par, ParallelPayload)
    assert (par.wait_strategy, par.branch_failure) == ("any", "fail")
    tr = ir.nodes["c"].payload
    assert isinstance(tr, TransformPayload)
    assert tr.transformations[0].type == "deduplicate"
    term = ir.nodes["b"].payload
    assert isinstance(term, TerminatePayload)
    assert term.status == "failed"


def test_aggregate_expression_is_parsed_into_named_aggregates() -> None:
    ir = compile_ok(doc({"a": {"type": "transform", "transformations": [
        {"type": "aggregate", "source_variable": "rows", "expression": "count, sum(amount), avg(x.y) as mean",
         "output_variable": "stats"}]}}, variables_schema={"rows": {"type": "array"}}))
    tr = ir.nodes["a"].payload
    assert isinstance(tr, TransformPayload)
    assert [(a.function, a.field, a.name) for a in tr.transformations[0].aggregates] == [
        ("count", None, "count"), ("sum", "amount", "sum_amount"), ("avg", "x.y", "mean")]


def test_output_mappings_are_normalised() -> None:
    ir = compile_ok(doc({"a": {"type": "sequence", "agent": "API", "steps": [
        {"step_id": "s", "action": "fetch", "output_mapping": {
            "a": "json_extract: data.items[0]", "b": "$.x", "c": "raw", "d": "regex:id=(\\d+)",
            "e": "xpath://title", "f": "jmespath:items[*].id", "g": "{{result.x}}-{{text}}"}}]}}))
    mapping = sequence_payload(ir).steps[0].output_mapping
    assert {k: m.kind for k, m in mapping.items()} == {
        "a": "json", "b": "json", "c": "text", "d": "regex", "e": "xpath", "f": "jmespath", "g": "template"}
    assert mapping["a"].argument == "data.items[0]"
    assert mapping["d"].argument == "id=(\\d+)"


def test_secrets_in_agent_parameters_are_recorded_with_their_alias() -> None:
    ir = compile_ok(doc({"a": {"type": "sequence", "agent": "WEB", "steps": [
        {"step_id": "s", "action": "login", "user": "{{secrets.portal.username}}"}]}},
        global_config={"secrets_config": {"provider": "azure_keyvault",
                                          "secret_references": {"portal": {"key": "portal-creds"}}}}))
    [ref] = sequence_payload(ir).steps[0].secrets
    assert (ref.alias, ref.field) == ("portal", "username")
    assert ir.global_config.secrets_config.provider == "azure"
    assert ir.secrets["portal"].key == "portal-creds"


def test_secret_in_encrypt_key_is_allowed_but_not_in_its_value() -> None:
    ok = compile_document(doc({"a": {"type": "processing", "operations": [
        {"action": "encrypt", "value": "v", "key": "{{secrets.k}}", "output_variable": "c"}]}}))
    assert ok.ir is not None
    bad = compile_document(doc({"a": {"type": "processing", "operations": [
        {"action": "encrypt", "value": "{{secrets.k}}", "key": "{{secrets.k}}"}]}}))
    assert [d.path for d in bad.errors] == ["/workflow_graph/nodes/a/operations/0/value"]


def test_subflow_bare_references_become_paths_and_the_rest_templates() -> None:
    ir = compile_ok(doc({
        "a": {"type": "subflow", "procedure_id": "child", "version": "latest",
              "input_mapping": {"id": "order.id", "note": "hello {{order.id}}", "literal": "plain text"},
              "output_mapping": {"total": "summary.total"}, "next_node": "b"},
        "b": {"type": "terminate"}}, variables_schema={"order": {"type": "object"}}))
    sub = ir.nodes["a"].payload
    assert isinstance(sub, SubflowPayload)
    assert sub.version is None
    assert set(sub.input_paths) == {"id"}
    assert sub.input_mapping.source == {"note": "hello {{order.id}}", "literal": "plain text"}
    assert sub.output_mapping["total"].source == "summary.total"
    assert [(r.node_id, r.procedure_id) for r in ir.subflow_refs] == [("a", "child")]


def test_trigger_nested_blocks_fold_into_flat_fields_and_flat_wins() -> None:
    ir = compile_ok(doc({"a": {"type": "terminate"}}, trigger={
        "type": "event", "event": {"provider": "nats", "topic": "lo.ext.orders"},
        "event_config": {"event_filter": "event_payload.total > 10"}, "dedupe_window_seconds": 30}))
    assert ir.trigger is not None
    assert ir.trigger.event_source == "nats://lo.ext.orders"
    assert ir.trigger.event_filter is not None
    assert ir.trigger.event_filter.source == "event_payload.total > 10"
    flat_wins = compile_ok(doc({"a": {"type": "terminate"}}, trigger={
        "type": "webhook", "webhook_secret": "flat", "webhook_config": {"secret": "nested"}}))
    assert flat_wins.trigger is not None
    assert flat_wins.trigger.webhook_secret == "flat"


def test_approval_payload_and_edges() -> None:
    ir = compile_ok(doc({
        "a": {"type": "human_approval", "decision_type": "select_option", "options": ["card", "deny"],
              "option_routes": {"deny": "no"}, "on_approve": "yes", "timeout_ms": 1000,
              "timeout_action": "auto_approve", "approval_level": "manager"},
        "yes": {"type": "terminate"}, "no": {"type": "terminate", "status": "failed"}}))
    payload = ir.nodes["a"].payload
    assert isinstance(payload, HumanApprovalPayload)
    assert payload.option_routes == {"deny": "no"}
    assert sorted((e.target, e.kind, e.label) for e in ir.edges) == [
        ("no", "option", "deny"), ("yes", "approve", None)]


def test_error_handler_recovery_strategy_alias_and_recovery_steps() -> None:
    ir = compile_ok(doc({
        "a": {"type": "sequence", "agent": "DESKTOP", "next_node": "b",
              "steps": [{"step_id": "s", "action": "click"}],
              "error_handlers": [{"error_type": "TimeoutError", "recovery_strategy": "fallback_node",
                                  "fallback_node": "b", "recovery_steps": [{"step_id": "r", "action": "press_keys"}]}]},
        "b": {"type": "terminate"}}))
    [handler] = ir.nodes["a"].error_handlers
    assert handler.action == "escalate"
    assert [s.binding.plan for s in handler.recovery_steps] == ["channel:desktop:press_keys"]
    assert ("a", "b", "fallback") in {(e.source, e.target, e.kind) for e in ir.edges}


def test_event_payloads_are_bounded() -> None:
    from ckp_core.redaction import FIELD_LIMIT, PAYLOAD_LIMIT, bound_payload

    big = "x" * (FIELD_LIMIT + 10)
    out = bound_payload({"small": "ok", "big": big})
    assert out["small"] == "ok"
    assert out["big"]["_truncated"] is True
    assert out["big"]["bytes"] == len(big) + 2
    many = {f"f{i}": "y" * (FIELD_LIMIT - 100) for i in range(6)}
    bounded = bound_payload(many)
    truncated = [k for k, v in bounded.items() if isinstance(v, dict)]
    assert 0 < len(truncated) < 6
    import json

    assert len(json.dumps(bounded)) <= PAYLOAD_LIMIT
