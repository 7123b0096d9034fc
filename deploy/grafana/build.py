"""LangOrch's Grafana dashboards, written as code so that a review reads queries rather than panel JSON.

``python deploy/grafana/build.py`` rewrites ``dashboards/*.json`` and the Kubernetes objects made from deploy/'s
files: the ConfigMaps that Grafana's dashboard sidecar loads (``deploy/k8s/base/grafana-dashboards.yaml``) and the
Prometheus Operator's ``PrometheusRule`` holding ``deploy/prometheus/alerts.yml``
(``deploy/k8s/base/prometheus-rules.yaml``); ``--check`` exits 1 when a committed file differs from what this
module builds. Only metric names that the services really export are used (api.md §13.1
lists them; ``tests/test_deploy_prometheus.py`` evaluates every query against a live stack).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

HERE = Path(__file__).resolve().parent
DASHBOARD_DIR = HERE / "dashboards"
CONFIGMAPS = HERE.parent / "k8s" / "base" / "grafana-dashboards.yaml"
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = HERE.parent / "k8s" / "base" / "prometheus-rules.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
RANGE = "$__range"
WIDTH = 24


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat"] = "timeseries"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A dashboard variable listing the values of ``label`` on ``metric`` (``selector``: its label matchers,
    which may use the variables before it); several values or All (any value, empty included) may be picked."""

    name: str
    title: str
    metric: str
    label: str
    selector: str = ""

    @property
    def query(self) -> str:
        return f"label_values({self.metric}{self.selector}, {self.label})"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = field(default=("langorch",))
    variables: tuple[Variable, ...] = ()

    @property
    def file_name(self) -> str:
        return f"{self.uid}.json"

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def quantile(metric: str, phi: float, by: str = "", where: str = "") -> str:
    """The ``phi`` quantile of histogram ``metric`` over all replicas (per ``by`` label when given; of the series
    matching ``where``'s label matchers)."""
    labels = f"le, {by}" if by else "le"
    selector = f"{{{where}}}" if where else ""
    return f"histogram_quantile({phi}, sum by ({labels}) (rate({metric}_bucket{selector}[{RATE}])))"


def ts(title: str, description: str, *queries: Query, unit: str = "short") -> Panel:
    return Panel(title, description, tuple(queries), unit)


def stat(title: str, description: str, query: Query, unit: str = "short") -> Panel:
    return Panel(title, description, (query,), unit, "stat")


OVERVIEW = Dashboard("langorch-overview", "LangOrch / Overview",
                     "Runs started and ended, latency, queue depth and projection lag of one LangOrch installation.", (
    Row("Now", (
        stat("Runs executing", "Runs in status running, from the runs projection (cluster-wide).",
             q('max(langorch_runs{status="running"})')),
        stat("Runs waiting for approval", "Runs in status waiting_approval (cluster-wide).",
             q('max(langorch_runs{status="waiting_approval"})')),
        stat("Pending approvals", "Approvals not yet decided (cluster-wide).", q("max(langorch_approvals_pending)")),
        stat("Failed runs in range", "Runs that ended failed within the dashboard's time range, all replicas.",
             q(f'sum(increase(langorch_run_completed_total{{status="failed"}}[{RANGE}]))')),
    )),
    Row("Runs", (
        ts("Runs started", "Runs that began executing, per second, by how they were created.",
           q(f"sum by (trigger_type) (rate(langorch_run_started_total[{RATE}]))", "{{trigger_type}}"), unit="ops"),
        ts("Runs ended", "Runs that ended, per second, by final status.",
           q(f"sum by (status) (rate(langorch_run_completed_total[{RATE}]))", "{{status}}"), unit="ops"),
        ts("Failed-run ratio", "Failed runs over all ended runs (the LangOrchFailedRunRatioHigh alert's figure).",
           q(f'sum(rate(langorch_run_completed_total{{status="failed"}}[{RATE}])) / '
             f"sum(rate(langorch_run_completed_total[{RATE}]))", "failed / ended"), unit="percentunit"),
        ts("Run duration", "First start to end of the runs that ended (p50 and p95).",
           q(quantile("langorch_run_duration_seconds", 0.5), "p50"),
           q(quantile("langorch_run_duration_seconds", 0.95), "p95"), unit="s"),
        ts("Runs by status", "Every run of the runs projection by status (cluster-wide).",
           q("max by (status) (langorch_runs)", "{{status}}")),
    )),
    Row("Backlog and API", (
        ts("Runtime queue depth", "Commands waiting for the runtime's consumers: run_queue (start, resume) and "
           "control (agents, leases).",
           q("max by (queue_type) (langorch_queue_depth)", "{{queue_type}}")),
        ts("Projection lag", "Events of the stream not yet applied to each projection table.",
           q("max by (projection) (langorch_projection_lag_events)", "{{projection}}")),
        ts("API requests", "HTTP requests the gateways answered, per second, by status.",
           q(f"sum by (status) (rate(langorch_http_requests_total[{RATE}]))", "{{status}}"), unit="reqps"),
        ts("API latency", "HTTP request duration over all routes (p50 and p99).",
           q(quantile("langorch_http_request_duration_seconds", 0.5), "p50"),
           q(quantile("langorch_http_request_duration_seconds", 0.99), "p99"), unit="s"),
    )),
))

# the runs, steps and SLA breaches of the procedures and nodes picked in the runs-and-steps dashboard
PROCEDURE = 'procedure_id=~"$procedure"'
NODE = f'{PROCEDURE}, node_id=~"$node"'
PROCEDURE_VARIABLE = Variable("procedure", "Procedure", "langorch_run_started_total", "procedure_id")
NODE_VARIABLE = Variable("node", "Node", "langorch_step_execution_total", "node_id", "{" + PROCEDURE + "}")

RUNS = Dashboard("langorch-runs-steps", "LangOrch / Runs and steps",
                 "Runs, steps, retries, failures and SLA breaches per procedure and node; approvals and triggers. "
                 "Pick procedures and nodes above; a run's own timeline is in the console.", (
    Row("Runs by procedure", (
        ts("Runs started by procedure", "Runs that began executing, per second, by procedure.",
           q(f"sum by (procedure_id) (rate(langorch_run_started_total{{{PROCEDURE}}}[{RATE}]))", "{{procedure_id}}"),
           unit="ops"),
        ts("Runs ended by procedure", "Runs that ended, per second, by procedure and final status.",
           q(f"sum by (procedure_id, status) (rate(langorch_run_completed_total{{{PROCEDURE}}}[{RATE}]))",
             "{{procedure_id}} {{status}}"), unit="ops"),
        ts("Run duration by procedure", "p95 of the first start to end, by procedure.",
           q(quantile("langorch_run_duration_seconds", 0.95, "procedure_id", PROCEDURE), "{{procedure_id}}"),
           unit="s"),
        ts("Run failures by procedure", "Failed runs in the time range, by procedure and error code.",
           q(f"sum by (procedure_id, error_code) (increase(langorch_run_failures_total{{{PROCEDURE}}}[{RANGE}]))",
             "{{procedure_id}} {{error_code}}")),
    )),
    Row("Nodes", (
        ts("Steps by node", "Steps finished per second, by procedure, node and outcome.",
           q(f"sum by (procedure_id, node_id, status) (rate(langorch_step_execution_total{{{NODE}}}[{RATE}]))",
             "{{procedure_id}} {{node_id}} {{status}}"), unit="ops"),
        ts("Step duration by node", "p95 of completed steps, by procedure and node.",
           q(quantile("langorch_step_duration_seconds", 0.95, "procedure_id, node_id", NODE),
             "{{procedure_id}} {{node_id}}"), unit="s"),
        ts("Retries by node", "Step retries in the time range, by procedure and node.",
           q(f"sum by (procedure_id, node_id) (increase(langorch_retry_attempts_total{{{NODE}}}[{RANGE}]))",
             "{{procedure_id}} {{node_id}}")),
        ts("SLA breaches by node", "Node SLA breaches in the time range, by procedure, node and on_breach action.",
           q(f"sum by (procedure_id, node_id, on_breach) (increase(langorch_sla_breach_total{{{NODE}}}[{RANGE}]))",
             "{{procedure_id}} {{node_id}} {{on_breach}}")),
        ts("Step timeouts by node", "Step attempts that timed out in the time range, by procedure and node.",
           q(f"sum by (procedure_id, node_id) (increase(langorch_step_timeout_total{{{NODE}}}[{RANGE}]))",
             "{{procedure_id}} {{node_id}}")),
    )),
    Row("Runs", (
        ts("Run failures by error code", "Failed runs by the code of their error, in the time range.",
           q(f"sum by (error_code) (increase(langorch_run_failures_total[{RANGE}]))", "{{error_code}}")),
        ts("Run duration by status", "p95 of the first start to end, by final status.",
           q(quantile("langorch_run_duration_seconds", 0.95, "status"), "{{status}}"), unit="s"),
        ts("Runs recovered", "Runs continued from a checkpoint after their replica stopped, per second.",
           q(f"sum(rate(langorch_run_recovered_total[{RATE}]))", "recovered"), unit="ops"),
    )),
    Row("Steps", (
        ts("Steps finished", "Steps per second by binding and outcome (replayed: a recorded result reused).",
           q(f"sum by (binding, status) (rate(langorch_step_execution_total[{RATE}]))", "{{binding}} {{status}}"),
           unit="ops"),
        ts("Step duration", "p95 of completed steps by binding.",
           q(quantile("langorch_step_duration_seconds", 0.95, "binding"), "{{binding}}"), unit="s"),
        ts("Retries", "Step retries per second by binding.",
           q(f"sum by (binding) (rate(langorch_retry_attempts_total[{RATE}]))", "{{binding}}"), unit="ops"),
        ts("Step timeouts", "Step attempts that timed out, in the time range, by binding.",
           q(f"sum by (binding) (increase(langorch_step_timeout_total[{RANGE}]))", "{{binding}}")),
        ts("Custom metrics", "Node telemetry.custom_metrics, per second, by name.",
           q(f"sum by (name) (rate(langorch_custom_metric_total[{RATE}]))", "{{name}}")),
    )),
    Row("SLAs and approvals", (
        ts("SLA breaches", "Node SLA breaches in the time range, by the node's on_breach action.",
           q(f"sum by (on_breach) (increase(langorch_sla_breach_total[{RANGE}]))", "{{on_breach}}")),
        ts("Approvals requested", "Approval requests per second by decision type.",
           q(f"sum by (decision_type) (rate(langorch_approval_requests_total[{RATE}]))", "{{decision_type}}"),
           unit="ops"),
        ts("Approval outcomes", "Approvals decided, timed out or canceled, in the time range.",
           q(f"sum by (outcome) (increase(langorch_approval_decisions_total[{RANGE}]))", "{{outcome}}")),
        ts("Approval latency", "p95 of request to decision or timeout, by outcome.",
           q(quantile("langorch_approval_decision_latency_seconds", 0.95, "outcome"), "{{outcome}}"), unit="s"),
    )),
    Row("Triggers", (
        ts("Trigger fires", "Fires that created a run, per second, by how the run was started.",
           q(f"sum by (trigger_type) (rate(langorch_trigger_fired_total[{RATE}]))", "{{trigger_type}}"),
           unit="ops"),
        ts("Fires refused", "Fires that created no run, in the time range, by reason (duplicate, "
           "max_concurrent_runs, invalid_input, not_runnable, misfire).",
           q(f"sum by (reason) (increase(langorch_trigger_rejected_total[{RANGE}]))", "{{reason}}")),
        ts("Fire to run", "p95 from a fire's receipt by the triggers service to its run's creation.",
           q(quantile("langorch_trigger_lag_seconds", 0.95, "trigger_type"), "{{trigger_type}}"), unit="s"),
        ts("Schedule lag", "How late the scheduler replica sends the fires of cron schedules: from each slot to "
           "its fire being published (p50 and p95). A slot more than 120 s late is skipped as a misfire.",
           q(quantile("langorch_trigger_scheduler_lag_seconds", 0.5), "p50"),
           q(quantile("langorch_trigger_scheduler_lag_seconds", 0.95), "p95"), unit="s"),
        ts("Webhook intake", "Webhook requests per second by outcome (accepted, duplicate, invalid_signature, "
           "not_found …).",
           q(f"sum by (outcome) (rate(langorch_webhook_requests_total[{RATE}]))", "{{outcome}}"), unit="reqps"),
        ts("Event trigger deliveries", "LO_EXT messages delivered to the event triggers per second, matched by an "
           "enabled trigger or not.",
           q(f"sum by (result) (rate(langorch_trigger_events_total[{RATE}]))", "{{result}}"), unit="ops"),
    )),
), variables=(PROCEDURE_VARIABLE, NODE_VARIABLE))

AGENTS = Dashboard("langorch-agents-llm", "LangOrch / Agents, MCP and LLM",
                   "Calls to HTTP agents, MCP tools and LLMs, their errors, open circuits, lease pools and LLM "
                   "usage.", (
    Row("Agents and MCP", (
        ts("Agent calls", "HTTP agent calls per second by outcome.",
           q(f"sum by (outcome) (rate(langorch_agent_requests_total[{RATE}]))", "{{outcome}}"), unit="ops"),
        ts("Agent call errors", "Share of agent calls that did not succeed.",
           q(f'sum(rate(langorch_agent_requests_total{{outcome!="success"}}[{RATE}])) / '
             f"sum(rate(langorch_agent_requests_total[{RATE}]))", "errors / calls"), unit="percentunit"),
        ts("Agent call duration", "p95 of HTTP agent calls by channel.",
           q(quantile("langorch_agent_request_duration_seconds", 0.95, "channel"), "{{channel}}"), unit="s"),
        ts("MCP tool calls", "MCP tool calls per second by outcome.",
           q(f"sum by (outcome) (rate(langorch_mcp_requests_total[{RATE}]))", "{{outcome}}"), unit="ops"),
        ts("Open circuits", "Circuit breakers open now, by target (agent id or model).",
           q("max by (target_kind, target) (langorch_circuit_breaker_open)", "{{target_kind}} {{target}}")),
    )),
    Row("Leases", (
        ts("Leases held", "Lease slots held now, by pool.",
           q("sum by (pool_id) (langorch_leases_active)", "{{pool_id}}")),
        ts("Lease wait", "p95 of the wait for a free lease slot, by pool.",
           q(quantile("langorch_lease_wait_seconds", 0.95, "pool_id"), "{{pool_id}}"), unit="s"),
        ts("Pool saturation", "Dispatches that found every slot of their pool held, in the time range.",
           q(f"sum by (pool_id) (increase(langorch_pool_saturation_total[{RANGE}]))", "{{pool_id}}")),
    )),
    Row("LLM", (
        ts("LLM requests", "Chat completion requests per second by model and outcome.",
           q(f"sum by (model, outcome) (rate(langorch_llm_requests_total[{RATE}]))", "{{model}} {{outcome}}"),
           unit="ops"),
        ts("LLM latency", "p95 of LLM requests by model.",
           q(quantile("langorch_llm_request_duration_seconds", 0.95, "model"), "{{model}}"), unit="s"),
        ts("LLM tokens", "Tokens per second by model and kind (prompt, completion).",
           q(f"sum by (model, kind) (rate(langorch_llm_tokens_total[{RATE}]))", "{{model}} {{kind}}")),
        ts("LLM cost", "Estimated cost in the time range, by model.",
           q(f"sum by (model) (increase(langorch_llm_cost_usd_total[{RANGE}]))", "{{model}}"), unit="currencyUSD"),
    )),
))

BACKBONE = Dashboard("langorch-event-backbone", "LangOrch / Event backbone",
                     "What the services consume from NATS JetStream: consumer backlog, projection lag, settle "
                     "outcomes (nak: delivered again), handler time, commands and append conflicts.", (
    Row("Lag and backlog", (
        ts("Runtime consumer backlog", "Commands pending in the runtime's consumers (LO_CMD).",
           q("max by (queue_type) (langorch_queue_depth)", "{{queue_type}}")),
        ts("Projection lag", "Stream head minus the position each projection applied.",
           q("max by (projection) (langorch_projection_lag_events)", "{{projection}}")),
        ts("Event trigger backlog age", "Age of the oldest LO_EXT message the triggers service has not handled.",
           q("max(langorch_trigger_event_oldest_pending_age_seconds)", "oldest pending"), unit="s"),
        ts("Read-your-writes wait", "p95 of the time requests waited for a projection to reach their write.",
           q(quantile("langorch_read_your_writes_wait_seconds", 0.95), "p95"), unit="s"),
    )),
    Row("Messages", (
        ts("Messages settled", "Messages handled per second by service and outcome: ack done, nak delivered "
           "again (a redelivery), term dropped.",
           q(f"sum by (service, outcome) (rate(langorch_bus_messages_total[{RATE}]))", "{{service}} {{outcome}}"),
           unit="ops"),
        ts("Handler duration", "p95 of one message's handling, by service.",
           q(quantile("langorch_bus_handler_duration_seconds", 0.95, "service"), "{{service}}"), unit="s"),
        ts("Commands", "Commands the gateways published, per second, by outcome.",
           q(f"sum by (outcome) (rate(langorch_commands_total[{RATE}]))", "{{outcome}}"), unit="ops"),
        ts("Append conflicts", "Event appends refused by the expected-sequence check, in the time range.",
           q(f"sum by (aggregate) (increase(langorch_event_append_conflicts_total[{RANGE}]))", "{{aggregate}}")),
    )),
))

DASHBOARDS: tuple[Dashboard, ...] = (OVERVIEW, RUNS, AGENTS, BACKBONE)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int, height: int) -> dict[str, Any]:
    targets = [{"datasource": DATASOURCE, "expr": query.expr, "legendFormat": query.legend or "__auto",
                "refId": chr(ord("A") + i)} for i, query in enumerate(panel.queries)]
    body: dict[str, Any] = {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": height, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []}, "targets": targets,
    }
    if panel.kind == "timeseries":
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                           "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "colorMode": "value", "graphMode": "none", "textMode": "auto"}
    return body


def _variable_json(variable: Variable) -> dict[str, Any]:
    return {"name": variable.name, "label": variable.title, "type": "query", "datasource": DATASOURCE,
            "definition": variable.query, "query": {"query": variable.query, "refId": "LangOrchVariableQuery"},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "sort": 1, "hide": 0,
            "regex": "", "options": []}


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The Grafana JSON model of ``dashboard``: rows of panels, two time series or four stats across."""
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row in dashboard.rows:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": WIDTH, "x": 0, "y": y}})
        next_id += 1
        y += 1
        x = height = 0
        for panel in row.panels:
            width, height = (6, 4) if panel.kind == "stat" else (12, 8)
            if x + width > WIDTH:
                x, y = 0, y + height
            panels.append(_panel_json(panel, next_id, x, y, width, height))
            next_id += 1
            x += width
        y += height
    return {
        "uid": dashboard.uid, "title": dashboard.title, "description": dashboard.description,
        "tags": list(dashboard.tags), "editable": False, "graphTooltip": 1, "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "timezone": "browser",
        "templating": {"list": [{"name": "datasource", "label": "Data source", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
                                 "options": []}, *map(_variable_json, dashboard.variables)]},
        "annotations": {"list": []}, "links": [], "panels": panels,
    }


def dashboard_text(dashboard: Dashboard) -> str:
    return json.dumps(render(dashboard), indent=2, ensure_ascii=False) + "\n"


def configmaps_text() -> str:
    """One ConfigMap per dashboard, labelled for Grafana's dashboard sidecar (``grafana_dashboard: "1"``)."""
    docs = []
    for dashboard in DASHBOARDS:
        body = json.dumps(render(dashboard), separators=(",", ":"), ensure_ascii=False)
        docs.append(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
            f"  name: grafana-dashboard-{dashboard.uid}\n"
            "  labels:\n    grafana_dashboard: \"1\"\n"
            "  annotations:\n    grafana_folder: LangOrch\n"
            f"data:\n  {dashboard.file_name}: {json.dumps(body, ensure_ascii=False)}\n")
    header = "# Generated by deploy/grafana/build.py: edit the builder, not this file.\n"
    return header + "---\n".join(docs)


def _string(dumper: Any, value: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


# a SafeDumper that writes multi-line strings (the rules' expressions) as literal blocks, as alerts.yml has them
_BLOCK_DUMPER: Any = type("_BlockDumper", (yaml.SafeDumper,), {})
_BLOCK_DUMPER.add_representer(str, _string)


def prometheus_rule_text() -> str:
    """alerts.yml's rule groups as a ``PrometheusRule`` (the Prometheus Operator's form of a rule file)."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "langorch-alerts"}, "spec": {"groups": groups}}
    header = "# Generated by deploy/grafana/build.py from deploy/prometheus/alerts.yml: edit alerts.yml instead.\n"
    return header + str(yaml.dump(rule, Dumper=_BLOCK_DUMPER, sort_keys=False, width=120))


def outputs() -> dict[Path, str]:
    """Every file the builder owns and its expected text."""
    files = {DASHBOARD_DIR / d.file_name: dashboard_text(d) for d in DASHBOARDS}
    files[CONFIGMAPS] = configmaps_text()
    files[PROMETHEUS_RULE] = prometheus_rule_text()
    return files


def main(argv: Sequence[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        if check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{path} differs from deploy/grafana/build.py's output: run python deploy/grafana/build.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
