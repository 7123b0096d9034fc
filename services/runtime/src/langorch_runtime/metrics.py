"""Runtime metrics (api.md §13.1): derived from the run events this replica appends, so every count matches the
timeline. Labels stay bounded: binding kinds, statuses, error codes, configured metric names, and the procedure and
node ids of the run and step metrics (the procedures imported and their nodes; ``node_id`` is left empty when
``LANGORCH_METRICS_NODE_LABELS`` is off). Run, node and step instance ids are never labels."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ckp_core import runs
from ckp_core.events import EventData
from ckp_core.ir import ProcedureIR

CUSTOM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_CUSTOM_NAMES = 100
FAILURE_CODES = frozenset({
    "no_executor", "agent_error", "agent_unavailable", "agent_protocol_error", "dispatch_failed", "callback_timeout",
    "workflow_failed", "mcp_tool_error", "mcp_error", "step_timeout", "lease_wait_timeout", "lease_revoked",
    "rate_limited", "llm_error", "budget_exceeded", "secret_not_found", "secret_unavailable", "expression_error",
    "operation_failed", "schema_validation_failed", "decryption_failed", "conversion_failed", "validation_failed",
    "verification_failed", "logic_no_route", "loop_iterator_invalid", "loop_iteration_failed",
    "parallel_branch_failed", "parallel_all_failed", "subflow_failed", "subflow_not_found", "subflow_recursion",
    "subflow_depth_exceeded", "subflow_input_invalid", "sla_breached", "max_hops_exceeded", "deadline_exceeded",
    "state_too_large", "procedure_not_runnable", "procedure_not_effective", "terminated_failed", "internal_error",
})
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 600)
BINDINGS = frozenset({"internal", "agent_http", "agent_workflow", "mcp_tool", "llm"})

# (target_kind, target) of every circuit open now: agent/MCP circuits from the registry, LLM ones per model
CircuitSource = Callable[[], Iterable[tuple[str, str]]]


class _StateCollector:
    """Gauges read at scrape time from the dispatcher's and the LLM client's own state."""

    def __init__(self) -> None:
        self.circuits: list[CircuitSource] = []
        self.queue_depth: dict[str, int] = {}

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        circuits = GaugeMetricFamily("langorch_circuit_breaker_open", "Circuit breakers open now (1 per target)",
                                     labels=["target_kind", "target"])
        seen: set[tuple[str, str]] = set()
        for source in self.circuits:
            for kind, target in source():
                if (kind, target) not in seen:
                    seen.add((kind, target))
                    circuits.add_metric([kind, target], 1)
        queues = GaugeMetricFamily("langorch_queue_depth", "Messages pending in the runtime's consumers",
                                   labels=["queue_type"])
        for queue_type, depth in sorted(self.queue_depth.items()):
            queues.add_metric([queue_type], depth)
        return [circuits, queues]


class RuntimeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, node_labels: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        self.node_labels = node_labels  # False: node_id is "" (a label Prometheus drops), per procedure only
        r = self.registry
        run, node = ["procedure_id"], ["procedure_id", "node_id"]
        self.run_started = Counter("langorch_run_started_total", "Runs started", ["trigger_type", *run],
                                   registry=r)
        self.run_completed = Counter("langorch_run_completed_total", "Runs ended", ["status", *run], registry=r)
        self.run_duration = Histogram("langorch_run_duration_seconds", "Run duration, first start to end",
                                      ["status", *run], buckets=DURATION_BUCKETS, registry=r)
        self.run_failures = Counter("langorch_run_failures_total", "Failed runs by error code",
                                    ["error_code", *run], registry=r)
        self.run_recovered = Counter("langorch_run_recovered_total", "Runs resumed after their replica died",
                                     registry=r)
        self.steps = Counter("langorch_step_execution_total", "Step executions", ["binding", "status", *node],
                             registry=r)
        self.step_duration = Histogram("langorch_step_duration_seconds", "Step attempt duration", ["binding", *node],
                                       registry=r)
        self.step_timeouts = Counter("langorch_step_timeout_total", "Step attempt timeouts", ["binding", *node],
                                     registry=r)
        self.retries = Counter("langorch_retry_attempts_total", "Step retries", ["binding", *node], registry=r)
        self.llm_tokens = Counter("langorch_llm_tokens_total", "LLM tokens", ["model", "kind"], registry=r)
        self.llm_cost = Counter("langorch_llm_cost_usd_total", "Estimated LLM cost", ["model"], registry=r)
        self.sla_breaches = Counter("langorch_sla_breach_total", "SLA breaches", ["on_breach", *node], registry=r)
        self.budget_exceeded = Counter("langorch_budget_exceeded_total", "LLM budgets exceeded", registry=r)
        self.callback_timeouts = Counter("langorch_callback_timeout_total", "Async callbacks that timed out",
                                         ["callback_type"], registry=r)
        self.custom = Counter("langorch_custom_metric_total", "Node telemetry.custom_metrics", ["name"], registry=r)
        self._custom_names: set[str] = set()
        # calls made by the dispatcher and the LLM client (one per dispatched attempt / per model tried)
        self.agent_requests = Counter("langorch_agent_requests_total", "HTTP agent calls", ["channel", "outcome"],
                                      registry=r)
        self.agent_duration = Histogram("langorch_agent_request_duration_seconds", "HTTP agent call duration",
                                        ["channel"], buckets=CALL_BUCKETS, registry=r)
        self.mcp_requests = Counter("langorch_mcp_requests_total", "MCP tool calls", ["channel", "outcome"],
                                    registry=r)
        self.llm_requests = Counter("langorch_llm_requests_total", "LLM chat completion requests",
                                    ["model", "outcome"], registry=r)
        self.llm_duration = Histogram("langorch_llm_request_duration_seconds", "LLM request duration", ["model"],
                                      buckets=CALL_BUCKETS, registry=r)
        self.llm_fallbacks = Counter("langorch_llm_fallbacks_total", "LLM calls answered by a fallback model",
                                     ["primary_model", "used_model"], registry=r)
        self.pool_saturation = Counter("langorch_pool_saturation_total",
                                       "Dispatches that found every slot of their candidates held", ["pool_id"],
                                       registry=r)
        self.lease_wait = Histogram("langorch_lease_wait_seconds", "Wait for a free lease slot", ["pool_id"],
                                    buckets=WAIT_BUCKETS, registry=r)
        self.leases_active = Gauge("langorch_leases_active", "Lease slots this replica holds now", ["pool_id"],
                                   registry=r)
        self.state = _StateCollector()
        r.register(self.state)
        self.models: frozenset[str] = frozenset()

    def configure_models(self, names: Iterable[str]) -> None:
        """The configured model names: any other model is reported as ``other`` (bounded labels)."""
        self.models = frozenset(names)

    def model_label(self, name: str | None) -> str:
        return name if name is not None and name in self.models else "other"

    def observer(self, ir: ProcedureIR, run_created: dict[str, Any], started_at: float | None) -> RunObserver:
        return RunObserver(self, ir, run_created, started_at)


def binding_label(step_started: dict[str, Any]) -> str:
    """The ``binding`` label of a step from its ``step_started`` payload (api.md §13.1); ``channel`` (a step
    answered before an agent was chosen: override, mock, dry run, no executor) counts as ``agent_http``."""
    kind = step_started.get("binding_kind") or "internal"
    if kind in BINDINGS:
        return str(kind)
    return "agent_http" if kind == "channel" else "internal"


class RunObserver:
    """Updates the metrics from one run's events (bindings remembered per step attempt)."""

    def __init__(self, metrics: RuntimeMetrics, ir: ProcedureIR, run_created: dict[str, Any],
                 started_at: float | None) -> None:
        self.m = metrics
        self.ir = ir
        self.trigger_type = str(run_created.get("trigger_type") or "api")
        self.procedure = ir.procedure_id
        self.started_at = started_at
        self.bindings: dict[tuple[Any, Any, Any], str] = {}

    def binding(self, data: dict[str, Any]) -> str:
        return self.bindings.get((data.get("node_id"), data.get("step_id"), data.get("frame")), "internal")

    def node(self, data: dict[str, Any]) -> tuple[str, str]:
        """The ``procedure_id`` and ``node_id`` labels of a step or node event (the IR's own node id: bounded)."""
        node_id = data.get("node_id")
        known = self.m.node_labels and isinstance(node_id, str) and node_id in self.ir.nodes
        return self.procedure, str(node_id) if known else ""

    def step(self, data: dict[str, Any]) -> tuple[str, str, str]:
        """The ``binding``, ``procedure_id`` and ``node_id`` labels of a step event."""
        return (self.binding(data), *self.node(data))

    def __call__(self, event: EventData, occurred: float) -> None:
        t, d = event.TYPE, event.model_dump(mode="json")
        m = self.m
        if t == "execution_started":
            m.run_started.labels(self.trigger_type, self.procedure).inc()
            self.started_at = occurred
        elif t == "execution_recovered":
            m.run_recovered.inc()
        elif t == "step_started":
            self.bindings[(d.get("node_id"), d.get("step_id"), d.get("frame"))] = binding_label(d)
        elif t == "step_completed":
            binding, procedure, node = self.step(d)
            m.steps.labels(binding, "completed", procedure, node).inc()
            m.step_duration.labels(binding, procedure, node).observe((d.get("duration_ms") or 0) / 1000)
        elif t == "step_replayed":
            binding, procedure, node = self.step(d)
            m.steps.labels(binding, "replayed", procedure, node).inc()
        elif t == "step_failed":
            binding, procedure, node = self.step(d)
            m.steps.labels(binding, "failed", procedure, node).inc()
        elif t == "step_timeout":
            m.step_timeouts.labels(*self.step(d)).inc()
        elif t == "step_retrying":
            m.retries.labels(*self.step(d)).inc()
        elif t == "llm_usage":
            model = str(d.get("model") or "other")
            m.llm_tokens.labels(model, "prompt").inc(d.get("prompt_tokens") or 0)
            m.llm_tokens.labels(model, "completion").inc(d.get("completion_tokens") or 0)
            m.llm_cost.labels(model).inc(d.get("estimated_cost_usd") or 0.0)
        elif t == "sla_breached":
            m.sla_breaches.labels(str(d.get("on_breach")), *self.node(d)).inc()
        elif t == "budget_exceeded":
            m.budget_exceeded.inc()
        elif t == "callback_timed_out":
            m.callback_timeouts.labels("workflow").inc()
        elif t == "node_completed":
            self.custom_metrics(str(d.get("node_id")))
        elif t in runs.END_EVENTS:
            status = runs.END_EVENTS[t]
            m.run_completed.labels(status, self.procedure).inc()
            if self.started_at is not None:
                m.run_duration.labels(status, self.procedure).observe(max(0.0, occurred - self.started_at))
            if t == "run_failed":
                code = str((d.get("error") or {}).get("code") or "internal_error")
                code = "agent_http_4xx" if code.startswith("agent_http_") else code
                code = code if code in FAILURE_CODES or code == "agent_http_4xx" else "other"
                m.run_failures.labels(code, self.procedure).inc()

    def custom_metrics(self, node_id: str) -> None:
        node = self.ir.nodes.get(node_id)
        if node is None or node.telemetry is None or not self.ir.global_config.telemetry_enabled:
            return
        for metric in node.telemetry.custom_metrics:
            name = metric.name
            if name not in self.m._custom_names:
                if len(self.m._custom_names) >= MAX_CUSTOM_NAMES or not CUSTOM_NAME.match(name):
                    name = "other"
                else:
                    self.m._custom_names.add(name)
            self.m.custom.labels(name).inc(metric.value)
