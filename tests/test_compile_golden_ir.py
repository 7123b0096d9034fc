"""Golden IR: the compiler's complete output (the IR's JSON text and every diagnostic, message included) for the
compile bench document, every file in examples/, and a bench document with a broken field in each node.

The expected values are SHA-256 digests of that output taken from the compiler before its speed work (issue 14,
goal 6), so a change that makes compiling faster must leave both byte-identical. An intended change of the IR or of
a diagnostic regenerates them: ``LANGORCH_PRINT_GOLDEN=1 uv run pytest tests/test_compile_golden_ir.py -s``
prints the current digests; review why each one moved before pasting them here.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ckp_core.compiler import canonical_json, compile_document, compile_text, content_hash
from tests.helpers import EXAMPLES

pytestmark = pytest.mark.unit

_spec = importlib.util.spec_from_file_location("bench_compile", Path(__file__).parents[1] / "bench" / "compile.py")
assert _spec is not None
assert _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# One broken field per node, by node index modulo the list: (field path inside the node, value). Each makes the
# compiler report something (wrong types, unknown fields and targets, bad expressions and placeholders, reserved
# names, aliases), so the digests pin diagnostics' messages, paths and node/step ids too.
BREAKAGES: list[tuple[tuple[str | int, ...], Any]] = [  # 21 entries: each meets every node type of the block of 5
    (("description", ), 5),
    (("steps", 0, "variable"), "run_id"),
    (("next_node", ), "nowhere"),
    (("steps", 1, "value", "note"), "{{ amount + }}"),
    (("rules", 0, "condition"), "amount >"),
    (("status", ), "failure"),
    (("steps", 0, "step_id"), "bad id!"),
    (("surprise", ), True),
    (("steps", 0, "action"), "format_data"),
    (("rules", 0, "next_node"), 7),
    (("outputs", "secret"), "{{secrets.api.key}}"),
    (("steps", 1, "value"), "{{undeclared_thing}}"),
    (("steps", 0, "retry_config"), {"max_attempts": 3, "delay_ms": 5, "jitter": True}),
    (("steps", 0, "level"), "LOUD"),
    (("default_next_node", ), None),
    (("outputs", ), []),
    (("steps", 1, "step_id"), "count"),
    (("workflow_dispatch_mode", ), "SYNC"),
    (("agent", ), 12),
    (("rules", ), "no"),
    (("error_handlers", ), [{"error_type": "*", "fallback_node": "n00000"}, {"action": "retry", "max_retries": 0}]),
]


def _set(node: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    target: Any = node
    for key in path[:-1]:
        if isinstance(target, dict) and key not in target:
            return
        if isinstance(target, list) and not (isinstance(key, int) and key < len(target)):
            return
        target = target[key]
    if isinstance(target, list) and not (isinstance(path[-1], int) and path[-1] < len(target)):
        return
    target[path[-1]] = value


# Those that are warnings or aliases only: the document still compiles, so its IR is pinned too.
LENIENT = [BREAKAGES[i] for i in (7, 8, 11, 12, 14, 17)]


def broken_document(n_nodes: int, breakages: list[tuple[tuple[str | int, ...], Any]] = BREAKAGES) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(bench.build_document(n_nodes))
    for i, node in enumerate(doc["workflow_graph"]["nodes"].values()):
        path, value = breakages[i % len(breakages)]
        _set(node, path, value)
    return doc


def documents() -> dict[str, str]:
    docs = {f"examples/{p.relative_to(EXAMPLES).as_posix()}": p.read_text(encoding="utf-8")
            for p in sorted(EXAMPLES.rglob("*.json"))}
    docs["bench-2000"] = json.dumps(bench.build_document(2000), indent=1)
    docs["bench-broken-200"] = json.dumps(broken_document(200))
    docs["bench-lenient-200"] = json.dumps(broken_document(200, LENIENT))
    return docs


def output_digest(text: str) -> str:
    """The SHA-256 of everything a compilation returns: ids, diagnostics (all fields) and the IR's JSON text."""
    result = compile_text(text)
    diagnostics = [d.model_dump(mode="json") for d in result.diagnostics]
    ir = result.ir.model_dump_json(by_alias=True) if result.ir is not None else "null"
    out = json.dumps({"procedure_id": result.procedure_id, "version": result.version, "diagnostics": diagnostics},
                     sort_keys=True) + "\n" + ir
    return hashlib.sha256(out.encode("utf-8")).hexdigest()


GOLDEN: dict[str, str] = {
    "bench-2000":
        "91d7415f1941535843cdc03ad24984b42ad597254467dd6718e06bccf0dcda29",
    "bench-broken-200":
        "13e6e9d7bdc6e7b3815133ea7caac267500b901a404fd83f8188c51c78549421",
    "bench-lenient-200":
        "39ac86aa3bad53512ca34491607d112c04d4d5243394623fa7254e7a3fa0bc7b",
    "examples/hybrid_dispatch.ckp.json":
        "1e75349e8be1980590311088b722b6737492e0f9c2137cfc7fa64a62848bb13c",
    "examples/internal_variables.ckp.json":
        "e8e408598084fc40711528ba2407aa737331d6cb98dffab08f34ca206a932f26",
    "examples/minimal_greeting.ckp.json":
        "155dc618891f14113615e2b7a422c052dcfd03b32d549089c9bf912b49e6f02a",
    "examples/multi_agent_invoice.ckp.json":
        "08aaca97cdb1af77923561f20d1bd53b24d1cf3f17a9eb09c8bf70b3257a5244",
    "examples/product_enrichment_pipeline.ckp.json":
        "e4f9b03191b167e9f3689875d53872884fe73aa5639d0420651a59f7dd1c1f05",
    "examples/rejected/list_dialect_all_options.json":
        "e42a9c8049f79f82c0b9e157f08ba3a4bc24dafc35d94d85276b78777fa9ea79",
    "examples/rejected/list_dialect_secrets.json":
        "e42a9c8049f79f82c0b9e157f08ba3a4bc24dafc35d94d85276b78777fa9ea79",
    "examples/rejected/swarm_dialect_triage.json":
        "e42a9c8049f79f82c0b9e157f08ba3a4bc24dafc35d94d85276b78777fa9ea79",
    "examples/rejected/unknown_node_type_hil.json":
        "acff252b2b0a4f8a6cbc15ba2e64b4b8533e8b9fee7812165d3f83db2f08f269",
    "examples/simple_http_test.ckp.json":
        "7c7cf4041b1e482d581c2ddab49061ac997723f9d88c79bbb4680c36b958a00e",
    "examples/web_title_check.ckp.json":
        "26ff48b438a428256b527bbe8ba18163aa69081178ef8c53a351142e6d33f31e",
}


@pytest.mark.parametrize("name", sorted(documents()))
def test_compile_output_is_byte_identical_to_golden(name: str) -> None:
    digest = output_digest(documents()[name])
    if os.environ.get("LANGORCH_PRINT_GOLDEN") == "1":
        print(f"    {name!r}: {digest!r},")
    assert digest == GOLDEN[name]


def test_broken_document_reports_a_problem_for_each_breakage() -> None:
    """The broken bench document is a diagnostics fixture only if its breakages are reported."""
    result = compile_text(json.dumps(broken_document(200)))
    assert result.ir is None
    codes = {d.code for d in result.diagnostics}
    assert {"reserved_variable_name", "unknown_target", "template_syntax_error", "expression_syntax_error",
            "invalid_identifier", "unknown_field", "alias_normalised", "invalid_type",
            "secret_not_allowed", "undeclared_variable", "duplicate_id", "shadowed_error_handler",
            "retry_without_retries"} <= codes
    lenient = compile_text(json.dumps(broken_document(200, LENIENT)))
    assert lenient.ir is not None
    assert {"unknown_field", "alias_normalised", "undeclared_variable", "logic_without_default"} <= {
        d.code for d in lenient.diagnostics}


TRICKY_VALUES: list[Any] = [
    "".join(chr(i) for i in range(0x800)) + "\u2028\u2029\ufeff\U0001f600",  # controls, quotes, escapes, non-BMP
    {"é": 1, "e": 2, "\U0001f600": 3, "z\x00": 4, "Z": 5, "": 6},  # key order by code point
    [2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**64) - 1, 10**40],  # within and beyond 64 bits
    [0.1, 1.0, 2.5e-7, 1e16, 1e22, 123456789012345680.0, -0.0, 5e-324],  # floats: repr-formatted
    [True, False, None, [], {}],
]


@pytest.mark.parametrize("value", TRICKY_VALUES)
def test_content_hash_is_the_sha256_of_canonical_json_for_any_value(value: Any) -> None:
    """The compiler's faster canonical JSON hashes exactly what :func:`canonical_json` writes."""
    doc = json.loads((EXAMPLES / "minimal_greeting.ckp.json").read_text(encoding="utf-8"))
    doc["provenance"] = {"value": value}
    result = compile_document(doc)
    assert result.ir is not None
    expected = "sha256:" + hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()
    assert result.ir.content_hash == expected == content_hash(doc)
