"""Runtime metrics derived from run events (api.md §13.1), including node telemetry.custom_metrics (ckp.md §7.8)."""

from __future__ import annotations

import time

import pytest

from ckp_core.events import ErrorObject, SlaBreached, StepRetrying
from langorch_runtime.metrics import RuntimeMetrics
from runtime_harness import ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit


async def test_counters_follow_the_run_events() -> None:
    flaky = ErrorObject(code="agent_unavailable", message="503", retryable=True)
    agent = ScriptedDispatcher({"fetch": [flaky, {"ok": 1}]})
    document = doc({
        "a": {"type": "sequence", "agent": "API", "next_node": "b",
              "telemetry": {"custom_metrics": ["orders_seen", {"name": "amount_total", "value": 2.5}, "Bad-Name"]},
              "steps": [{"step_id": "f", "action": "fetch", "retry_on_failure": True},
                        {"step_id": "l", "action": "log", "message": "x"}]},
        "b": {"type": "processing", "next_node": "z", "operations": [{"action": "calculate", "expression": "1/0"}]},
        "z": {"type": "terminate"}})
    run = await run_doc(document, dispatcher=agent)
    metrics = RuntimeMetrics()
    observe = metrics.observer(run.ir, {"trigger_type": "api"}, None)
    from ckp_core.events import ExecutionStarted, RunFailed

    observe(ExecutionStarted(entry_node_id="a", execution_mode="production"), time.time() - 2)
    for event in run.events:
        observe(event, time.time())
    assert run.outcome is not None
    observe(RunFailed(error=ErrorObject.model_validate(run.outcome["error"])), time.time())

    def value(metric: str, **labels: str) -> float:
        got = metrics.registry.get_sample_value(metric, labels)
        return 0.0 if got is None else got

    procedure = run.ir.procedure_id
    node_a = {"procedure_id": procedure, "node_id": "a"}
    assert value("langorch_run_started_total", trigger_type="api", procedure_id=procedure) == 1
    assert value("langorch_step_execution_total", binding="agent_http", status="completed", **node_a) == 1
    assert value("langorch_step_execution_total", binding="internal", status="completed", **node_a) == 1
    assert value("langorch_step_duration_seconds_count", binding="agent_http", **node_a) == 1
    assert value("langorch_retry_attempts_total", binding="agent_http", **node_a) == 1
    assert value("langorch_custom_metric_total", name="orders_seen") == 1
    assert value("langorch_custom_metric_total", name="amount_total") == 2.5
    assert value("langorch_run_completed_total", status="failed", procedure_id=procedure) == 1
    assert value("langorch_run_failures_total", error_code="expression_error", procedure_id=procedure) == 1
    assert value("langorch_run_duration_seconds_count", status="failed", procedure_id=procedure) == 1


async def test_the_node_label_can_be_turned_off_and_names_only_the_procedures_nodes() -> None:
    """LANGORCH_METRICS_NODE_LABELS=false: node_id is empty (Prometheus drops an empty label), per procedure only;
    a node id that is not one of the IR's nodes is never a label value."""
    document = doc({"a": {"type": "sequence", "next_node": "z", "sla": {"max_duration_ms": 1, "on_breach": "warn"},
                          "steps": [{"step_id": "w", "action": "log", "message": "x"}]},
                    "z": {"type": "terminate"}})
    run = await run_doc(document)
    procedure = run.ir.procedure_id
    flaky = ErrorObject(code="agent_unavailable", message="503", retryable=True)
    for node_labels, node in ((True, "a"), (False, "")):
        metrics = RuntimeMetrics(node_labels=node_labels)
        observe = metrics.observer(run.ir, {}, None)
        for event in run.events:
            observe(event, time.time())
        observe(SlaBreached(node_id="a", limit_ms=1, elapsed_ms=30, on_breach="warn"), time.time())
        observe(StepRetrying(node_id="not-a-node", step_id="w", action="log", delay_ms=0, next_attempt=2,
                             source="retry_policy", error=flaky), time.time())
        got = metrics.registry.get_sample_value
        labels = {"procedure_id": procedure, "node_id": node}
        assert got("langorch_step_execution_total", {"binding": "internal", "status": "completed", **labels}) == 1
        assert got("langorch_sla_breach_total", {"on_breach": "warn", **labels}) == 1
        assert got("langorch_retry_attempts_total", {"binding": "internal", "procedure_id": procedure,
                                                     "node_id": ""}) == 1


async def test_custom_metrics_are_off_when_telemetry_is_disabled() -> None:
    document = doc({"a": {"type": "sequence", "next_node": "z", "telemetry": {"custom_metrics": {"seen": 3}},
                          "steps": []}, "z": {"type": "terminate"}}, global_config={"telemetry_enabled": False})
    run = await run_doc(document)
    metrics = RuntimeMetrics()
    observe = metrics.observer(run.ir, {}, None)
    for event in run.events:
        observe(event, time.time())
    assert metrics.registry.get_sample_value("langorch_custom_metric_total", {"name": "seen"}) is None
