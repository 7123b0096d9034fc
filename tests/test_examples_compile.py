"""Every example in examples/ compiles to the outcome this slice promises (examples are tests)."""

from __future__ import annotations

import json

import pytest

from ckp_core.compiler import compile_text
from tests.helpers import EXAMPLES

pytestmark = pytest.mark.unit

REJECTED = {
    "list_dialect_all_options.json": ("unsupported_dialect", "/nodes"),
    "list_dialect_secrets.json": ("unsupported_dialect", "/nodes"),
    "swarm_dialect_triage.json": ("unsupported_dialect", "/nodes"),
    "unknown_node_type_hil.json": ("unknown_node_type", "/workflow_graph/nodes/gate/type"),
}


@pytest.mark.parametrize("name", ["simple_http_test.ckp.json", "minimal_greeting.ckp.json"])
def test_runnable_examples_compile_without_errors(name: str) -> None:
    result = compile_text((EXAMPLES / name).read_bytes())
    assert result.errors == []
    assert result.ir is not None
    assert json.loads(result.ir.model_dump_json(by_alias=True))["procedure_id"] == result.procedure_id


@pytest.mark.parametrize(("name", "expected"), sorted(REJECTED.items()))
def test_rejected_examples_have_one_diagnostic_with_its_path(name: str, expected: tuple[str, str]) -> None:
    result = compile_text((EXAMPLES / "rejected" / name).read_bytes())
    assert result.ir is None
    assert [(d.code, d.path) for d in result.diagnostics] == [expected]


@pytest.mark.parametrize("name", ["hybrid_dispatch.ckp.json", "web_title_check.ckp.json",
                                  "product_enrichment_pipeline.ckp.json", "multi_agent_invoice.ckp.json"])
def test_examples_beyond_this_slice_are_refused_only_for_unbuilt_features(name: str) -> None:
    result = compile_text((EXAMPLES / name).read_bytes())
    assert result.ir is None
    codes = {d.code for d in result.errors}
    assert codes == {"not_implemented"}, [d.message for d in result.errors if d.code != "not_implemented"]


def test_simple_http_test_ir_has_the_expected_graph() -> None:
    result = compile_text((EXAMPLES / "simple_http_test.ckp.json").read_bytes())
    assert result.ir is not None
    edges = {(e.source, e.target, e.kind) for e in result.ir.edges}
    assert edges == {("fetch_data", "check_response", "next"), ("check_response", "success", "condition"),
                     ("check_response", "failure", "default")}
    assert result.ir.variables["post_id"].required is True
    assert result.ir.content_hash.startswith("sha256:")
