"""Runtime metrics derived from run events (api.md §13.1), including node telemetry.custom_metrics (ckp.md §7.8)."""

from __future__ import annotations

import time

import pytest

from ckp_core.events import ErrorObject
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

    assert value("langorch_run_started_total", trigger_type="api") == 1
    assert value("langorch_step_execution_total", binding="agent_http", status="completed") == 1
    assert value("langorch_step_execution_total", binding="internal", status="completed") == 1
    assert value("langorch_retry_attempts_total", binding="agent_http") == 1
    assert value("langorch_custom_metric_total", name="orders_seen") == 1
    assert value("langorch_custom_metric_total", name="amount_total") == 2.5
    assert value("langorch_run_completed_total", status="failed") == 1
    assert value("langorch_run_failures_total", error_code="expression_error") == 1
    assert value("langorch_run_duration_seconds_count", status="failed") == 1


async def test_custom_metrics_are_off_when_telemetry_is_disabled() -> None:
    document = doc({"a": {"type": "sequence", "next_node": "z", "telemetry": {"custom_metrics": {"seen": 3}},
                          "steps": []}, "z": {"type": "terminate"}}, global_config={"telemetry_enabled": False})
    run = await run_doc(document)
    metrics = RuntimeMetrics()
    observe = metrics.observer(run.ir, {}, None)
    for event in run.events:
        observe(event, time.time())
    assert metrics.registry.get_sample_value("langorch_custom_metric_total", {"name": "seen"}) is None
