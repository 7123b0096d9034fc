"""Golden tests: every example in examples/ (and examples/rejected/) compiles to its recorded outcome.

Each ``tests/golden/<file>.json`` records the diagnostics (severity, code, path), the nodes with their types and
the edges with their kinds, plus — for every warning — why it is expected. After an intended compiler change,
regenerate with ``LANGORCH_UPDATE_GOLDEN=1 uv run pytest tests/test_examples_compile.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckp_core.compiler import compile_text
from tests.helpers import EXAMPLES

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
FILES = sorted(p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.json"))

# The examples README's expectations: which files compile, which are rejected with one diagnostic.
REJECTED = {
    "rejected/list_dialect_all_options.json": ("unsupported_dialect", "/nodes"),
    "rejected/list_dialect_secrets.json": ("unsupported_dialect", "/nodes"),
    "rejected/swarm_dialect_triage.json": ("unsupported_dialect", "/nodes"),
    "rejected/unknown_node_type_hil.json": ("unknown_node_type", "/workflow_graph/nodes/gate/type"),
}
# Warnings allowed in multi_agent_invoice, each with its justification (README: "each one justified").
JUSTIFIED_WARNINGS = {
    ("ignored_trigger_field", "/trigger/event_config/event_filter"):
        "a scheduled trigger carries an event_config block; its fields cannot apply to a cron trigger",
    ("ignored_trigger_field", "/trigger/event_config/event_source"):
        "same block: event_source does not apply to a scheduled trigger",
    ("invalid_custom_metric", "/workflow_graph/nodes/fetch_emails/telemetry/custom_metrics/metric_type"):
        "custom_metrics maps a name to a string ('email_fetch'); a metric value must be a number, so it counts 1",
    ("undeclared_secret_alias", "/workflow_graph/nodes/update_database/steps/0/connection_string"):
        "'db_connection' is not among secrets_config.secret_references; it will be resolved by name",
    ("undeclared_variable", "/workflow_graph/nodes/workflow_complete/outputs/execution_duration_ms"):
        "'telemetry' is neither a variable nor a built-in; the output renders as null",
}


def outcome(name: str) -> dict[str, Any]:
    result = compile_text((EXAMPLES / name).read_bytes())
    out: dict[str, Any] = {
        "compiles": result.ok,
        "diagnostics": [[d.severity, d.code, d.path] for d in result.diagnostics],
    }
    if result.ir is not None:
        ir = result.ir
        out["nodes"] = {node_id: node.type for node_id, node in ir.nodes.items()}
        out["edges"] = sorted([e.source, e.target, e.kind] for e in ir.edges)
        out["external_calls"] = sorted(
            f"{n.id}.{s.step_id}:{s.binding.plan}"
            for n in ir.nodes.values() for s in getattr(n.payload, "steps", []) if s.binding.kind == "channel")
    return out


@pytest.mark.parametrize("name", FILES)
def test_example_matches_its_golden_outcome(name: str) -> None:
    golden = GOLDEN / (name.replace("/", "__") + ".json")
    actual = outcome(name)
    if os.environ.get("LANGORCH_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    assert golden.exists(), f"no golden file for {name}; run with LANGORCH_UPDATE_GOLDEN=1 and review it"
    assert actual == json.loads(golden.read_text())


@pytest.mark.parametrize("name", [f for f in FILES if not f.startswith("rejected/")])
def test_examples_compile_without_errors(name: str) -> None:
    result = compile_text((EXAMPLES / name).read_bytes())
    assert result.errors == []
    assert result.ir is not None
    reloaded = type(result.ir).model_validate_json(result.ir.model_dump_json(by_alias=True))
    assert reloaded == result.ir


@pytest.mark.parametrize(("name", "expected"), sorted(REJECTED.items()))
def test_rejected_examples_have_one_diagnostic_with_its_path(name: str, expected: tuple[str, str]) -> None:
    result = compile_text((EXAMPLES / name).read_bytes())
    assert result.ir is None
    assert [(d.code, d.path) for d in result.diagnostics] == [expected]


def test_every_rejected_file_is_listed() -> None:
    assert {f for f in FILES if f.startswith("rejected/")} == set(REJECTED)


@pytest.mark.parametrize("name", ["minimal_greeting.ckp.json", "internal_variables.ckp.json",
                                  "simple_http_test.ckp.json", "hybrid_dispatch.ckp.json", "web_title_check.ckp.json",
                                  "product_enrichment_pipeline.ckp.json"])
def test_plain_examples_have_no_warnings(name: str) -> None:
    result = compile_text((EXAMPLES / name).read_bytes())
    assert [d for d in result.diagnostics if d.severity == "warning"] == []


def test_multi_agent_invoice_warnings_are_each_justified() -> None:
    result = compile_text((EXAMPLES / "multi_agent_invoice.ckp.json").read_bytes())
    assert result.ir is not None
    warnings = {(d.code, d.path) for d in result.diagnostics if d.severity == "warning"}
    assert warnings == set(JUSTIFIED_WARNINGS)


def test_multi_agent_invoice_graph_has_every_node_and_edge() -> None:
    doc = json.loads((EXAMPLES / "multi_agent_invoice.ckp.json").read_text())
    result = compile_text(json.dumps(doc))
    assert result.ir is not None
    assert set(result.ir.nodes) == set(doc["workflow_graph"]["nodes"])
    edges = {(e.source, e.target, e.kind) for e in result.ir.edges}
    nodes = doc["workflow_graph"]["nodes"]
    for node_id, node in nodes.items():
        if node.get("next_node"):
            assert (node_id, node["next_node"], "next") in edges
        for rule in node.get("rules", []):
            assert (node_id, rule["next_node"], "condition") in edges
        for key, kind in (("on_approve", "approve"), ("on_reject", "reject"), ("on_timeout", "timeout"),
                          ("body_node", "loop_body"), ("default_next_node", "default")):
            if node.get(key):
                assert (node_id, node[key], kind) in edges
    assert (doc["workflow_graph"]["start_node"], doc["global_config"]["on_failure"], "on_failure") in edges


def test_internal_variables_ir_has_the_expected_graph() -> None:
    result = compile_text((EXAMPLES / "internal_variables.ckp.json").read_bytes())
    assert result.ir is not None
    edges = {(e.source, e.target, e.kind) for e in result.ir.edges}
    assert edges == {("fetch_data", "check_response", "next"), ("check_response", "success", "condition"),
                     ("check_response", "failure", "default")}
    assert result.ir.variables["post_id"].required is True
    assert result.ir.content_hash.startswith("sha256:")


def test_simple_http_test_makes_its_http_request_through_an_api_agent() -> None:
    """The example's name is true: its one external call is ``http_request`` on the ``api`` channel (an agent
    performs it; tests/test_simple_http_run_end_to_end.py runs it against a real server), retried on failure."""
    result = compile_text((EXAMPLES / "simple_http_test.ckp.json").read_bytes())
    assert result.ir is not None
    calls = [(n.id, s.step_id, s.binding.kind, s.binding.channel, s.action)
             for n in result.ir.nodes.values() for s in getattr(n.payload, "steps", [])]
    assert calls == [("fetch_post", "get_post", "channel", "api", "http_request")]
    [step] = result.ir.nodes["fetch_post"].payload.steps  # type: ignore[union-attr]
    assert step.retry is not None
