"""Static views of a procedure (api.md §4.6): graph layout, explain, diff, Mermaid and DOT."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ckp_core import analysis
from ckp_core.compiler import compile_document, content_hash, is_orchestrator
from ckp_core.ir import ProcedureIR

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.ckp.json"))


def load(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())  # type: ignore[no-any-return]


def compile_ok(doc: dict[str, Any]) -> ProcedureIR:
    result = compile_document(doc)
    assert result.ir is not None, result.diagnostics
    return result.ir


def doc(nodes: dict[str, Any], start: str = "a", **extra: Any) -> dict[str, Any]:
    return {"procedure_id": "p", "version": "1", **extra, "workflow_graph": {"start_node": start, "nodes": nodes}}


def apply_changes(document: Any, changes: list[dict[str, Any]]) -> Any:
    """Apply the JSON-Patch-style operations of a DiffOut in order (RFC 6901 pointers)."""
    root = {"": copy.deepcopy(document)}
    for change in changes:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in change["path"].split("/")[1:]]
        parent: Any = root
        key: Any = ""
        for part in parts:
            parent = parent[key]
            key = int(part) if isinstance(parent, list) else part
        if change["op"] == "remove":
            del parent[key]
        elif change["op"] == "add" and isinstance(parent, list):
            assert key == len(parent), "additions to arrays happen at the tail"
            parent.append(change["value"])
        else:
            parent[key] = change["value"]
    return root[""]


# -- graph view ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_graph_view_of_every_example_has_every_node_and_edge(name: str) -> None:
    ir = compile_ok(load(name))
    view = analysis.graph_view(ir)
    assert (view["procedure_id"], view["version"], view["start_node"]) == (ir.procedure_id, ir.version,
                                                                           ir.start_node)
    assert [n["id"] for n in view["nodes"]] == list(ir.nodes)
    assert sorted((e["source"], e["target"], e["kind"]) for e in view["edges"]) == \
        sorted((e.source, e.target, e.kind) for e in ir.edges)
    assert len({e["id"] for e in view["edges"]}) == len(view["edges"])
    positions = [(n["position"]["x"], n["position"]["y"]) for n in view["nodes"]]
    assert len(set(positions)) == len(positions), "two nodes share a position"
    for n in view["nodes"]:
        node = ir.nodes[n["id"]]
        assert n["type"] == n["data"]["node_type"] == node.type
        assert n["data"]["label"] == (node.description or node.id)
        assert n["data"]["color"] == analysis.NODE_COLORS[node.type]
        assert n["data"]["is_checkpoint"] is node.is_checkpoint
        assert n["data"]["sla_ms"] == (node.sla.max_duration_ms if node.sla else None)
    for e in view["edges"]:
        assert e["animated"] is (e["kind"] in {"loop_body", "branch"})


def test_graph_layout_is_deterministic_and_top_to_bottom() -> None:
    raw = load("multi_agent_invoice.ckp.json")
    first = analysis.graph_view(compile_ok(raw))
    again = analysis.graph_view(compile_ok(json.loads(json.dumps(raw))))
    assert first == again
    y = {n["id"]: n["position"]["y"] for n in first["nodes"]}
    assert y[first["start_node"]] == 0
    # this graph has no cycle: every edge points down
    for e in first["edges"]:
        assert y[e["target"]] > y[e["source"]], e
    # a join sits below every branch that reaches it (longest-path layering, not shortest distance)
    assert y["loop_invoices"] > y["escalate_to_executive"] > y["request_human_approval"]


def test_layout_ignores_back_edges_and_puts_unreachable_nodes_last() -> None:
    ir = compile_ok(doc({
        "a": {"type": "sequence", "next_node": "b"},
        "b": {"type": "logic", "rules": [{"condition": "{{n}} < 3", "next_node": "a"}], "default_next_node": "c"},
        "c": {"type": "terminate"},
        "island": {"type": "terminate"},
    }, variables_schema={"n": {"type": "number", "default": 0}}))
    view = analysis.graph_view(ir)
    y = {n["id"]: n["position"]["y"] for n in view["nodes"]}
    assert y["a"] < y["b"] < y["c"] < y["island"]
    assert y["island"] == max(y.values())


def test_duplicate_source_target_pairs_get_distinct_edge_ids() -> None:
    view = analysis.graph_view(compile_ok(load("product_enrichment_pipeline.ckp.json")))
    gate = [e for e in view["edges"] if e["source"] == "approval_gate" and e["target"] == "cleanup_rejected"]
    assert [e["kind"] for e in gate] == ["reject", "timeout"]
    assert [e["id"] for e in gate] == ["approval_gate->cleanup_rejected", "approval_gate->cleanup_rejected#2"]


# -- explain ---------------------------------------------------------------------------------------------------


def test_explain_lists_every_external_call_of_multi_agent_invoice() -> None:
    raw = load("multi_agent_invoice.ckp.json")
    out = analysis.explain(compile_ok(raw))
    expected = set()
    for node_id, node in raw["workflow_graph"]["nodes"].items():
        if node["type"] == "llm_action":
            expected.add((node_id, "llm", "llm", None, node.get("model", "chat")))
        if node["type"] == "sequence" and not is_orchestrator(node.get("agent")):
            steps = node.get("steps", []) + [s for h in node.get("error_handlers", [])
                                             for s in h.get("recovery_steps", [])]
            for s in steps:
                expected.add((node_id, s["step_id"], "agent_http", node["agent"].lower(), s["action"]))
    got = [(c["node_id"], c["step_id"], c["binding"], c["channel"], c["action"]) for c in out["external_calls"]]
    assert len(got) == len(set(got))
    assert set(got) == expected
    assert ("process_in_erp", "close_all_sap", "agent_http", "desktop", "press_keys") in got  # a recovery step
    assert ("enrich_with_llm", "llm", "llm", None, "gpt-4") in got


def test_explain_of_internal_variables_has_no_external_calls_and_the_declared_variables() -> None:
    out = analysis.explain(compile_ok(load("internal_variables.ckp.json")), {"post_id": 7})
    assert out["external_calls"] == []
    assert out["procedure_id"] == "internal-variables"
    assert out["variables"]["schema"]["post_id"]["required"] is True
    assert out["variables"]["required"] == []  # required, but satisfied by its default
    assert out["variables"]["provided"] == ["post_id"]
    assert "api_response" in out["variables"]["produced"]
    assert {"from": "check_response", "to": "success", "condition": "{{api_response.id}} > 0"} in out["edges"]
    assert {"from": "check_response", "to": "failure", "condition": "default"} in out["edges"]
    nodes = {n["id"]: n for n in out["nodes"]}
    assert nodes["fetch_data"]["actions"] == ["set_variable", "log"]


@pytest.mark.parametrize(("post_id", "end"), [(5, "success"), ("42", "success"), (0, "failure")])
def test_route_trace_follows_the_branch_the_inputs_select(post_id: Any, end: str) -> None:
    out = analysis.explain(compile_ok(load("internal_variables.ckp.json")), {"post_id": post_id})
    trace = out["route_trace"]
    assert [t["node_id"] for t in trace] == ["fetch_data", "check_response", end]
    assert trace[-1]["type"] == "terminate"
    # 0 selects the failure branch statically, and is reported as an invalid input all the same
    assert bool(out["input_errors"]) is (post_id == 0)


@pytest.mark.parametrize(("mode", "branch"), [("premium", "premium_enrichment"), ("standard", "standard_enrichment"),
                                              (None, "standard_enrichment")])
def test_route_trace_uses_defaults_and_stops_at_an_approval(mode: str | None, branch: str) -> None:
    inputs: dict[str, Any] = {"product_id": 3}
    if mode is not None:
        inputs["enrichment_mode"] = mode
    trace = analysis.explain(compile_ok(load("product_enrichment_pipeline.ckp.json")), inputs)["route_trace"]
    ids = [t["node_id"] for t in trace]
    assert ids == ["fetch_product", "quality_check", branch, "aggregate_results", "approval_gate"]
    assert "publish_results" in trace[-1]["reason"]
    assert "cleanup_rejected" in trace[-1]["reason"]


def test_route_trace_stops_where_a_condition_reads_a_value_written_at_run_time() -> None:
    out = analysis.explain(compile_ok(load("multi_agent_invoice.ckp.json")))
    last = out["route_trace"][-1]
    assert last["node_id"] == "validate_invoice_count"
    assert "invoice_list" in last["reason"]
    assert "parse_invoice_data" in last["reason"]
    assert out["input_errors"] == {}  # the {{today}} default is rendered at run creation, not an input error
    produced = set(out["variables"]["produced"])
    assert {"invoice_list", "current_invoice", "invoice_index", "processing_results", "extracted_metadata",
            "confidence_score", "summary_stats", "failed_invoices", "erp_transaction_id"} <= produced


def test_route_trace_stops_at_built_ins_and_at_cycles() -> None:
    builtin = compile_ok(doc({
        "a": {"type": "logic", "rules": [{"condition": "{{run_id}} == 'x'", "next_node": "b"}],
              "default_next_node": "b"},
        "b": {"type": "terminate"},
    }))
    trace = analysis.explain(builtin)["route_trace"]
    assert [t["node_id"] for t in trace] == ["a"]
    assert "built-in" in trace[0]["reason"]

    cycle = compile_ok(doc({
        "a": {"type": "sequence", "next_node": "b"},
        "b": {"type": "logic", "rules": [{"condition": "{{go_back}}", "next_node": "a"}], "default_next_node": "c"},
        "c": {"type": "terminate"},
    }, variables_schema={"go_back": {"type": "boolean", "default": False}}))
    assert [t["node_id"] for t in analysis.explain(cycle)["route_trace"]] == ["a", "b", "c"]
    looping = analysis.explain(cycle, {"go_back": True})["route_trace"]
    assert [t["node_id"] for t in looping] == ["a", "b", "a"]
    assert "cycle" in looping[-1]["reason"]


def test_missing_inputs_and_provided() -> None:
    ir = compile_ok(load("product_enrichment_pipeline.ckp.json"))
    out = analysis.explain(ir, {"enrichment_mode": "premium"})
    assert out["variables"]["required"] == ["product_id"]
    assert out["variables"]["missing_inputs"] == ["product_id"]
    assert out["variables"]["provided"] == ["enrichment_mode"]
    assert analysis.explain(ir, {"product_id": 9})["variables"]["missing_inputs"] == []


def test_policy_summary_of_multi_agent_invoice() -> None:
    raw = load("multi_agent_invoice.ckp.json")
    policy = analysis.explain(compile_ok(raw))["policy_summary"]
    nodes = raw["workflow_graph"]["nodes"]
    assert policy["checkpoints"] == {"strategy": "critical_nodes_only",
                                     "nodes": [n for n, v in nodes.items() if v.get("is_checkpoint")]}
    assert policy["timeouts"]["run_timeout_ms"] == raw["global_config"]["timeout_ms"]
    assert {(t["node_id"], t["step_id"]) for t in policy["timeouts"]["steps"]} == {
        (n, s["step_id"]) for n, v in nodes.items() for s in v.get("steps", []) if "timeout_ms" in s}
    assert [(s["node_id"], s["max_duration_ms"]) for s in policy["sla"]] == [("validate_in_portal", 60000)]
    retry_nodes = {(r["node_id"], r["source"]) for r in policy["retries"]}
    assert ("enrich_with_llm", "llm") in retry_nodes
    assert ("update_database", "error_handler") in retry_nodes
    assert {m["dispatch_mode"] for m in policy["dispatch_modes"]} == {"async"}


def test_dispatch_modes_and_hints_of_hybrid_dispatch() -> None:
    out = analysis.explain(compile_ok(load("hybrid_dispatch.ckp.json")))
    modes = {m["step_id"]: m["dispatch_mode"] for m in out["policy_summary"]["dispatch_modes"]}
    assert modes["workflow_async"] == "async"
    assert modes["workflow_sync"] == "sync"
    # none of these actions is in a conventional catalogue (the 'hybrid' channel has none)
    assert {h["step_id"] for h in out["hints"]} == {"tool_navigate", "workflow_async", "workflow_sync"}
    assert analysis.explain(compile_ok(load("web_title_check.ckp.json")))["hints"] == []


def test_explain_is_json_serialisable_for_every_example() -> None:
    for name in EXAMPLE_FILES:
        ir = compile_ok(load(name))
        out = analysis.explain(ir)
        assert json.loads(json.dumps(out)) == out
        assert out["diagnostics"] == [d.model_dump(mode="json") for d in ir.diagnostics]


# -- diff ------------------------------------------------------------------------------------------------------


def test_diff_of_identical_documents() -> None:
    a = load("multi_agent_invoice.ckp.json")
    out = analysis.diff(a, json.loads(json.dumps(a)), "1.2.0", "1.2.0", "inv")
    assert out["identical"] is True
    assert out["from_hash"] == out["to_hash"] == content_hash(a)
    assert out["changes"] == []
    assert out["summary"] == {"nodes_added": [], "nodes_removed": [], "nodes_changed": [], "variables_changed": [],
                              "trigger_changed": False, "global_config_changed": False}
    assert "unified" not in out


def test_diff_reports_nodes_added_removed_and_changed_with_field_paths() -> None:
    a = load("internal_variables.ckp.json")
    b = copy.deepcopy(a)
    nodes = b["workflow_graph"]["nodes"]
    nodes["success"]["outputs"]["result"] = "fine"
    nodes["check_response"]["default_next_node"] = "failure_v2"
    nodes["failure_v2"] = nodes.pop("failure")
    nodes["fetch_data"]["steps"].append({"step_id": "extra", "action": "log", "message": "x"})
    b["global_config"]["max_retries"] = 4
    out = analysis.diff(a, b, "1.0.0", "1.1.0", "internal-variables")
    assert out["identical"] is False
    s = out["summary"]
    assert (s["nodes_added"], s["nodes_removed"]) == (["failure_v2"], ["failure"])
    assert s["nodes_changed"] == ["fetch_data", "check_response", "success"]
    assert s["global_config_changed"] is True
    assert s["trigger_changed"] is False
    by_path = {c["path"]: c for c in out["changes"]}
    assert by_path["/workflow_graph/nodes/success/outputs/result"] == {
        "op": "replace", "path": "/workflow_graph/nodes/success/outputs/result", "from_value": "ok", "value": "fine"}
    assert by_path["/workflow_graph/nodes/failure"]["op"] == "remove"
    assert by_path["/workflow_graph/nodes/failure_v2"]["op"] == "add"
    assert by_path["/workflow_graph/nodes/fetch_data/steps/2"]["op"] == "add"
    assert by_path["/global_config/max_retries"]["value"] == 4
    assert apply_changes(a, out["changes"]) == b


def test_diff_changes_rebuild_the_target_document() -> None:
    a = load("multi_agent_invoice.ckp.json")
    b = copy.deepcopy(a)
    b["workflow_graph"]["nodes"]["validate_in_portal"]["steps"] = b["workflow_graph"]["nodes"]["validate_in_portal"][
        "steps"][:3]
    b["retrieval_metadata"]["keywords"] = ["invoice", {"odd/key~": True}]
    b["trigger"] = {"type": "manual"}
    b["provenance"]["sources"][0]["version"] = 3.3
    out = analysis.diff(a, b, "1.2.0", "1.3.0", "inv")
    assert out["summary"]["trigger_changed"] is True
    assert apply_changes(a, out["changes"]) == b
    assert apply_changes(b, analysis.diff(b, a, "x", "y", "inv")["changes"]) == a
    # type-aware: 1 and true are different JSON values
    c = copy.deepcopy(a)
    c["global_config"]["screenshot_on_fail"] = 1
    changes = analysis.diff(a, c, "1", "2", "inv")["changes"]
    assert changes == [{"op": "replace", "path": "/global_config/screenshot_on_fail", "from_value": True, "value": 1}]


def test_diff_variables_changed_uses_the_normalised_flat_schema() -> None:
    a = load("internal_variables.ckp.json")
    flat = copy.deepcopy(a)
    nested = flat.pop("variables_schema")
    flat["variables_schema"] = {**{k: {**v, "required": True} for k, v in nested["required"].items()},
                                **nested["optional"]}
    same = analysis.diff(a, flat, "1", "2", "p")
    assert same["summary"]["variables_changed"] == []
    assert same["identical"] is False
    changed = copy.deepcopy(flat)
    changed["variables_schema"]["post_id"]["validation"]["max"] = 200
    changed["variables_schema"]["new_var"] = {"type": "string"}
    del changed["variables_schema"]["api_response"]
    out = analysis.diff(a, changed, "1", "2", "p")
    assert out["summary"]["variables_changed"] == ["api_response", "new_var", "post_id"]


def test_diff_unified_mode() -> None:
    a = load("internal_variables.ckp.json")
    b = copy.deepcopy(a)
    b["workflow_graph"]["nodes"]["success"]["outputs"]["result"] = "fine"
    out = analysis.diff(a, b, "1.0.0", "1.1.0", "internal-variables", unified=True)
    assert out["changes"] == []
    text = out["unified"]
    assert text.startswith("--- internal-variables@1.0.0\n+++ internal-variables@1.1.0\n")
    assert '-          "result": "ok",\n' in text
    assert '+          "result": "fine",\n' in text
    assert analysis.diff(a, a, "1", "1", "p", unified=True)["unified"] == ""


# -- text renderings -------------------------------------------------------------------------------------------


AWKWARD = doc({
    "a": {"type": "sequence", "description": 'Say "hi" <b>#1</b> | `x`', "next_node": "end"},
    "end": {"type": "logic", "rules": [{"condition": "{{who}} == \"bob\"", "next_node": "a-b"}],
            "default_next_node": "a_b"},
    "a-b": {"type": "terminate"},
    "a_b": {"type": "terminate"},
}, variables_schema={"who": {"type": "string", "default": "x"}})


def test_mermaid_sanitises_ids_and_escapes_labels() -> None:
    ir = compile_ok(AWKWARD)
    text = analysis.mermaid(ir)
    assert text.startswith("flowchart TD\n")
    node_lines = [line.strip() for line in text.splitlines() if re.match(r"\s+n_\w+[\[{(]", line)]
    ids = [re.match(r"(n_\w+)", line).group(1) for line in node_lines]  # type: ignore[union-attr]
    assert len(ids) == len(set(ids)) == 4  # 'a-b' and 'a_b' stay distinct; 'end' is not a bare keyword
    assert all(re.fullmatch(r"n_[A-Za-z0-9_]+", i) for i in ids)
    edge_lines = [line for line in text.splitlines() if "-->" in line or "-.->" in line]
    assert len(edge_lines) == len(ir.edges)
    for line in [*node_lines, *edge_lines]:
        labels = re.findall(r'"([^"]*)"', line)
        assert labels, line
        for label in labels:
            assert "<" not in label
            assert ">" not in label
            assert "`" not in label
    assert "#quot;hi#quot;" in text
    assert "#35;1" in text
    assert '#quot;bob#quot;' in text


def test_dot_quotes_every_id_and_label() -> None:
    text = analysis.dot(compile_ok(AWKWARD))
    assert text.startswith('digraph "p@1" {')
    assert text.rstrip().endswith("}")
    assert '"a-b" [label="a-b\\n(terminate)"' in text
    assert '\\"hi\\"' in text
    assert '"end" -> "a-b" [label="{{who}} == \\"bob\\""];' in text
    # every statement line is balanced: quotes come in pairs once escaped quotes are removed
    for line in text.splitlines():
        assert line.replace('\\"', "").count('"') % 2 == 0, line
