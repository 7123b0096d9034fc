"""The compile-side CLI: ``langorch validate`` (diagnostics with source excerpts), ``explain`` and ``graph``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ckp_core import analysis
from ckp_core.compiler import compile_text
from langorch.cli import app
from langorch.excerpt import excerpt, locate, pointer_offsets
from tests.helpers import EXAMPLES, example

pytestmark = pytest.mark.unit

runner = CliRunner()
GOOD = sorted(str(p) for p in EXAMPLES.glob("*.ckp.json"))
REJECTED = sorted(str(p) for p in (EXAMPLES / "rejected").glob("*.json"))


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    doc = example("internal_variables.ckp.json")
    doc["workflow_graph"]["nodes"]["fetch_data"]["next_node"] = "nowhere"
    path = tmp_path / "bad.ckp.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


# -- excerpt helpers -------------------------------------------------------------------------------------------


def test_pointer_offsets_cover_every_member_and_element() -> None:
    text = (EXAMPLES / "multi_agent_invoice.ckp.json").read_text()
    offsets = pointer_offsets(text)

    def pointers(value: Any, path: str) -> list[str]:
        out = [path]
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
        for key, item in items:
            out += pointers(item, f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}")
        return out

    assert set(offsets) == set(pointers(json.loads(text), ""))
    found = locate(text, "/workflow_graph/nodes/process_in_erp/steps/4/keys/0")
    assert found is not None
    assert found.exact
    assert text.splitlines()[found.line - 1].strip() == '"keys": ["Enter"],'


def test_locate_falls_back_to_the_nearest_parent_and_handles_escapes() -> None:
    text = '{\n  "a/b": {\n    "x~y": [\n      1,\n      {"z": 2}\n    ]\n  }\n}\n'
    exact = locate(text, "/a~1b/x~0y/1/z")
    assert exact is not None
    assert (exact.line, exact.exact) == (5, True)
    parent = locate(text, "/a~1b/missing/deeper")
    assert parent is not None
    assert (parent.line, parent.pointer, parent.exact) == (2, "/a~1b", False)
    assert excerpt(text, 2, 1) == [(1, "{"), (2, '  "a/b": {'), (3, '    "x~y": [')]
    assert excerpt(text, 1, 2)[0] == (1, "{")


def test_pointer_offsets_survive_broken_json() -> None:
    offsets = pointer_offsets('{"a": 1, "b": [1, 2\n')
    assert "/a" in offsets
    assert "/b/1" in offsets


# -- validate --------------------------------------------------------------------------------------------------


def test_validate_examples_exit_0_and_rejected_exit_1() -> None:
    ok = runner.invoke(app, ["validate", *GOOD])
    assert ok.exit_code == 0, ok.output
    for path in GOOD:
        assert f"{path}: ok" in ok.output
    for path in REJECTED:
        result = runner.invoke(app, ["validate", path])
        assert result.exit_code == 1
        assert "rejected" in result.output
    mixed = runner.invoke(app, ["validate", GOOD[0], REJECTED[0]])
    assert mixed.exit_code == 1


def test_validate_shows_the_offending_source_line(bad_file: Path) -> None:
    result = runner.invoke(app, ["validate", str(bad_file)])
    assert result.exit_code == 1
    text = bad_file.read_text()
    n = line_of(text, '"nowhere"')
    marked = [line for line in result.output.splitlines() if line.lstrip().startswith(">")]
    assert f">{n:>5} |         \"next_node\": \"nowhere\"" in [line.strip() for line in marked]
    assert "unknown_target" in result.output
    # the lines around it are shown too, unmarked
    assert f"{n - 1:>5} | " + text.splitlines()[n - 2] in result.output


def test_validate_json_report(bad_file: Path) -> None:
    good = str(EXAMPLES / "multi_agent_invoice.ckp.json")
    result = runner.invoke(app, ["validate", "--json", good, str(bad_file)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert set(report) == {good, str(bad_file)}
    assert report[good]["valid"] is True
    assert (report[good]["procedure_id"], report[good]["version"]) == ("invoice_processing_web_desktop_email",
                                                                       "1.2.0")
    compiled = compile_text(Path(good).read_bytes())
    assert report[good]["summary"] == compiled.summary()
    assert [d["code"] for d in report[good]["diagnostics"]] == [d.code for d in compiled.diagnostics]
    good_text = Path(good).read_text()
    for d in report[good]["diagnostics"]:
        assert d["exact"] is True
        key = d["path"].rsplit("/", 1)[-1]
        assert f'"{key}"' in good_text.splitlines()[d["line"] - 1]
    bad = report[str(bad_file)]
    assert bad["valid"] is False
    assert bad["summary"]["errors"] == 1
    error = next(d for d in bad["diagnostics"] if d["severity"] == "error")
    assert error["code"] == "unknown_target"
    assert error["line"] == line_of(bad_file.read_text(), '"nowhere"')


def test_validate_points_invalid_json_at_the_parser_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "procedure_id": "x",\n  "version": "1"\n  "workflow_graph": {}\n}\n')
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "invalid_document" in result.output
    assert '>    4 |   "workflow_graph": {}' in result.output
    as_json = json.loads(runner.invoke(app, ["validate", "--json", str(path)]).stdout)
    assert as_json[str(path)]["diagnostics"][0]["line"] == 4


def test_validate_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    assert runner.invoke(app, ["validate", str(tmp_path / "nope.json")]).exit_code == 2


# -- explain ---------------------------------------------------------------------------------------------------


def test_explain_json_lists_every_external_call() -> None:
    path = EXAMPLES / "multi_agent_invoice.ckp.json"
    result = runner.invoke(app, ["explain", str(path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    ir = compile_text(path.read_bytes()).ir
    assert ir is not None
    assert out == json.loads(json.dumps(analysis.explain(ir)))
    channel_steps = {(n.id, s.step_id) for n in ir.nodes.values() for s in getattr(n.payload, "steps", [])
                     if s.binding.kind == "channel"}
    listed = {(c["node_id"], c["step_id"]) for c in out["external_calls"]}
    assert channel_steps <= listed
    assert ("enrich_with_llm", "llm") in listed


def test_explain_vars_select_the_route() -> None:
    path = str(EXAMPLES / "internal_variables.ckp.json")
    # post_id=0 is below the variable's minimum: the route is still traced, and explain exits 1 for the inputs
    for value, end, code in (("7", "success", 0), ("0", "failure", 1)):
        result = runner.invoke(app, ["explain", path, "--var", f"post_id={value}", "--json"])
        assert result.exit_code == code, result.output
        out = json.loads(result.stdout)
        assert [t["node_id"] for t in out["route_trace"]][-1] == end
        assert out["variables"]["provided"] == ["post_id"]


def test_explain_tables() -> None:
    path = EXAMPLES / "multi_agent_invoice.ckp.json"
    result = runner.invoke(app, ["explain", str(path)])
    assert result.exit_code == 0, result.output
    ir = compile_text(path.read_bytes()).ir
    assert ir is not None
    n_calls = len(analysis.explain(ir)["external_calls"])
    for title in ("Nodes", "Edges", "Variables", "Route trace", f"External calls ({n_calls})", "Retries", "SLA",
                  "Diagnostics"):
        assert title in result.output
    assert "invoice_processing_web_desktop_email 1.2.0" in result.output


def test_explain_refuses_a_document_with_errors_and_bad_vars(bad_file: Path) -> None:
    result = runner.invoke(app, ["explain", str(bad_file)])
    assert result.exit_code == 1
    assert "unknown_target" in result.stderr
    assert result.stdout == ""
    bad_var = runner.invoke(app, ["explain", str(EXAMPLES / "minimal_greeting.ckp.json"), "--var", "novalue"])
    assert bad_var.exit_code == 2


# -- graph -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GOOD)
def test_graph_formats(path: str) -> None:
    ir = compile_text(Path(path).read_bytes()).ir
    assert ir is not None
    as_json = runner.invoke(app, ["graph", path, "--format", "json"])
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == json.loads(json.dumps(analysis.graph_view(ir)))
    mermaid = runner.invoke(app, ["graph", path])
    assert mermaid.exit_code == 0
    assert mermaid.stdout == analysis.mermaid(ir)
    dot = runner.invoke(app, ["graph", path, "-f", "dot"])
    assert dot.exit_code == 0
    assert dot.stdout == analysis.dot(ir)
    assert dot.stdout.count(" -> ") == len(ir.edges)


def test_graph_rejects_unknown_formats_and_broken_documents(bad_file: Path) -> None:
    assert runner.invoke(app, ["graph", GOOD[0], "--format", "svg"]).exit_code == 2
    broken = runner.invoke(app, ["graph", str(bad_file)])
    assert broken.exit_code == 1
    assert broken.stdout == ""


def test_entry_point_runs_as_a_module() -> None:
    path = str(EXAMPLES / "internal_variables.ckp.json")
    proc = subprocess.run([sys.executable, "-m", "langorch", "graph", path, "--format", "json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert {n["id"] for n in json.loads(proc.stdout)["nodes"]} == {"fetch_data", "check_response", "success",
                                                                   "failure"}
