"""deploy/grafana: the committed dashboards and sidecar ConfigMaps are the builder's output, each dashboard picks
its Prometheus data source through ``${datasource}``, and every panel queries only metrics the services export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import BUILDER, DASHBOARDS, ROOT

pytestmark = pytest.mark.unit

METRIC = re.compile(r"\b(langorch_[a-z0-9_]+)")
SOURCES = [*ROOT.glob("services/*/src/**/*.py"), *ROOT.glob("libs/*/src/**/*.py")]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_names() -> set[str]:
    """Metric names declared in the services' code (``Counter("langorch_x", …)`` is exported as ``_total``)."""
    names: set[str] = set()
    for path in SOURCES:
        text = path.read_text()
        for kind, name in re.findall(r"(Counter|Gauge|Histogram|CounterMetricFamily|GaugeMetricFamily)\(\s*"
                                     r"\"(langorch_[a-z0-9_]+)\"", text):
            base = name.removesuffix("_total")
            names.add(f"{base}_total" if kind.startswith("Counter") else name)
    return names


def is_exported(name: str, exported: set[str]) -> bool:
    """``name`` is an exported metric, or a series of an exported histogram (``_bucket``, ``_sum``, ``_count``)."""
    base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
    return name in exported or base in exported


def test_committed_files_are_the_builders_output() -> None:
    files = BUILDER.outputs()
    assert len(files) == len(DASHBOARDS) + 2
    for path, text in files.items():
        assert Path(path).read_text() == text, f"{path} is stale: run python deploy/grafana/build.py"


def test_dashboards_use_the_datasource_variable_and_unique_panel_ids() -> None:
    for dashboard in DASHBOARDS:
        model = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / dashboard.file_name).read_text())
        variable, *others = model["templating"]["list"]
        assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
        assert [v["name"] for v in others] == [v.name for v in dashboard.variables]
        for other in others:  # label values read through the same data source
            assert other["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        panels = [p for p in model["panels"] if p["type"] != "row"]
        assert panels
        assert len({p["id"] for p in model["panels"]}) == len(model["panels"])
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_the_four_dashboards_cover_the_issue() -> None:
    titles = {d.uid: {p.title for p in d.panels()} for d in DASHBOARDS}
    assert {"Runs started", "Runs ended", "Run duration", "Runtime queue depth", "Projection lag"} <= \
        titles["langorch-overview"]
    assert {"Steps finished", "Retries", "SLA breaches", "Runs ended by procedure", "Run duration by procedure",
            "Steps by node", "Step duration by node", "Retries by node", "SLA breaches by node",
            "Schedule lag"} <= titles["langorch-runs-steps"]
    assert {"Agent calls", "Agent call errors", "MCP tool calls", "Open circuits", "Leases held", "Pool saturation",
            "LLM tokens", "LLM cost"} <= titles["langorch-agents-llm"]
    assert {"Runtime consumer backlog", "Projection lag", "Messages settled", "Append conflicts"} <= \
        titles["langorch-event-backbone"]


def test_runs_and_steps_are_shown_per_procedure_and_node() -> None:
    """The runs-and-steps dashboard's procedure and node variables list the label values of the runtime's metrics
    (node: of the procedures picked); its per-procedure and per-node panels filter on them, and no query uses a
    variable its dashboard does not define."""
    [runs] = [d for d in DASHBOARDS if d.uid == "langorch-runs-steps"]
    variables = {v.name: v.query for v in runs.variables}
    assert variables == {
        "procedure": "label_values(langorch_run_started_total, procedure_id)",
        "node": 'label_values(langorch_step_execution_total{procedure_id=~"$procedure"}, node_id)'}
    for panel in runs.panels():
        for query in panel.queries:
            if panel.title.endswith("by procedure"):
                assert 'procedure_id=~"$procedure"' in query.expr, panel.title
            if panel.title.endswith("by node"):
                assert 'procedure_id=~"$procedure", node_id=~"$node"' in query.expr, panel.title
                assert "node_id" in query.expr.partition(")")[0], panel.title  # grouped by node
    for dashboard in DASHBOARDS:
        defined = {v.name for v in dashboard.variables}
        for panel in dashboard.panels():
            for query in panel.queries:
                used = set(re.findall(r"\$([a-z]+)\b", query.expr.replace("$__", "")))
                assert used <= defined, (dashboard.uid, panel.title, used)


def test_panels_query_only_exported_metrics() -> None:
    exported = exported_names()
    assert "langorch_run_completed_total" in exported
    assert "langorch_http_requests_total" in exported  # declared as "langorch_http_requests"
    for dashboard in DASHBOARDS:
        for panel in dashboard.panels():
            for query in panel.queries:
                for name in METRIC.findall(query.expr):
                    assert is_exported(name, exported), f"{panel.title}: {name} is not exported"


def test_alert_rules_query_only_exported_metrics() -> None:
    exported = exported_names()
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in METRIC.findall(rule["expr"]):
                assert is_exported(name, exported), f"{rule['alert']}: {name} is not exported"


def test_provisioning_files() -> None:
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/langorch.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
    maps = list(yaml.safe_load_all((ROOT / "deploy/k8s/base/grafana-dashboards.yaml").read_text()))
    assert [m["metadata"]["labels"]["grafana_dashboard"] for m in maps] == ["1"] * len(DASHBOARDS)
    for config_map, dashboard in zip(maps, DASHBOARDS, strict=True):
        assert json.loads(config_map["data"][dashboard.file_name]) == BUILDER.render(dashboard)


def test_the_prometheus_rule_holds_the_alert_rules() -> None:
    rule = yaml.safe_load((ROOT / "deploy/k8s/base/prometheus-rules.yaml").read_text())
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
