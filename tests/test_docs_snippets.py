"""Every CKP example in the documentation compiles (or is rejected) exactly as its page says.

A fenced block in ``docs/`` is checked when the line just before its opening fence is a marker comment:

``<!-- ckp: [nodes|step] valid -->``
    The block compiles with no error diagnostics.
``<!-- ckp: [nodes|step] error|warning|info CODE -->``
    The block compiles with a diagnostic of that severity and code (``warning``/``info``: and no error).
``<!-- ckp: expressions -->``
    A text block of lines ``EXPRESSION => JSON`` (or ``=> error``): each expression evaluates to that value (or
    raises an expression error). A line ``# vars: {...}`` sets the variables of the lines after it.
``<!-- ckp: json -->``
    The block is JSON (a payload or an IR excerpt shown for reading); it must parse.

Without ``nodes``/``step`` the block is a whole CKP document. ``nodes`` is a ``workflow_graph.nodes`` object whose
first node is the start node; ``step`` is one step, placed in a ``sequence`` node that ends in ``terminate``.
In ``docs/ckp/`` every ``json`` block needs a marker, so an example cannot drift from the compiler unnoticed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ckp_core.compiler import compile_document
from ckp_core.expressions import ExpressionError, ExpressionSyntaxError, MappingScope, evaluate, parse_expression

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMPILER_SOURCES = sorted((ROOT / "libs" / "ckp-core" / "src" / "ckp_core").glob("*.py"))
MARKER = re.compile(r"^<!--\s*ckp:\s*(?P<spec>[^>]*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    spec: str | None
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _snippets(page: Path) -> list[Snippet]:
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = "\n".join(line.removeprefix(indent) for line in lines[i + 1:end])
        out.append(Snippet(page, i + 1, m["lang"], marker["spec"] if marker else None, body))
        i = end + 1
    return out


ALL = [s for page in sorted(DOCS.rglob("*.md")) for s in _snippets(page)]
MARKED = [s for s in ALL if s.spec is not None]


def _document(kind: str, data: Any) -> Any:
    if kind == "nodes":
        assert isinstance(data, dict) and data, "a nodes snippet is a non-empty object of nodes"
        return {"procedure_id": "doc_snippet", "version": "1.0.0",
                "workflow_graph": {"start_node": next(iter(data)), "nodes": data}}
    if kind == "step":
        return {"procedure_id": "doc_snippet", "version": "1.0.0",
                "workflow_graph": {"start_node": "main", "nodes": {
                    "main": {"type": "sequence", "steps": [data], "next_node": "done"},
                    "done": {"type": "terminate", "status": "success"}}}}
    return data


def _check_compile(snippet: Snippet, words: list[str]) -> None:
    kind = words.pop(0) if words and words[0] in ("nodes", "step") else "document"
    assert words, f"{snippet.where}: marker needs valid, error CODE, warning CODE or info CODE"
    doc = _document(kind, json.loads(snippet.body))
    result = compile_document(doc)
    found = [(d.severity, d.code) for d in result.diagnostics]
    errors = [f"{d.code} at {d.path or '/'}: {d.message}" for d in result.errors]
    expect = words[0]
    if expect == "valid":
        assert not errors, f"{snippet.where}: documented as valid, but: {errors}"
        return
    assert expect in ("error", "warning", "info") and len(words) == 2, f"{snippet.where}: bad marker {snippet.spec!r}"
    code = words[1]
    assert (expect, code) in found, f"{snippet.where}: expected {expect} {code}, compiler said {found}"
    if expect != "error":
        assert not errors, f"{snippet.where}: documented as compiling with a {expect}, but: {errors}"


def _check_expressions(snippet: Snippet) -> None:
    variables: dict[str, Any] = {}
    checked = 0
    for n, raw in enumerate(snippet.body.splitlines(), snippet.line + 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("# vars:"):
            variables = json.loads(line.removeprefix("# vars:"))
            continue
        if line.startswith("#"):
            continue
        source, sep, expected = line.partition(" => ")
        assert sep, f"{snippet.page.relative_to(ROOT)}:{n}: expected 'EXPRESSION => RESULT'"
        where = f"{snippet.page.relative_to(ROOT)}:{n}: {source}"
        if expected.strip() == "error":
            with pytest.raises((ExpressionError, ExpressionSyntaxError)):
                evaluate(parse_expression(source), MappingScope(variables))
        else:
            got = evaluate(parse_expression(source), MappingScope(variables))
            want = json.loads(expected)
            assert got == want and type(got) is type(want), f"{where}: documented {want!r}, evaluates to {got!r}"
        checked += 1
    assert checked, f"{snippet.where}: an expressions block without a single expression"


@pytest.mark.parametrize("snippet", MARKED, ids=[s.where for s in MARKED])
def test_documented_snippet_behaves_as_its_page_says(snippet: Snippet) -> None:
    words = (snippet.spec or "").split()
    assert words, f"{snippet.where}: empty ckp marker"
    if words[0] == "expressions":
        _check_expressions(snippet)
    elif words[0] == "json":
        json.loads(snippet.body)
    else:
        _check_compile(snippet, words)


def test_every_json_block_of_the_language_reference_is_checked() -> None:
    unmarked = [s.where for s in ALL if s.page.is_relative_to(DOCS / "ckp") and s.lang == "json" and s.spec is None]
    assert not unmarked, f"json blocks without a <!-- ckp: ... --> marker: {unmarked}"


def _compiler_codes() -> set[str]:
    codes: set[str] = set()
    for source in COMPILER_SOURCES:
        text = source.read_text(encoding="utf-8")
        codes |= set(re.findall(r"\.add\(\s*(?:\"(?:error|warning|info)\"|\w+),\s*\"([a-z_]+)\"", text))
        codes |= set(re.findall(r"code=\"([a-z_]+)\"", text))
    return codes


def test_every_diagnostic_code_has_a_documented_example() -> None:
    codes = _compiler_codes()
    assert len(codes) > 40, f"the code scan found only {sorted(codes)}; has the compiler's reporting changed?"
    shown = {s.spec.split()[-1] for s in MARKED if s.page == DOCS / "ckp" / "diagnostics.md" and s.spec
             and s.spec.split()[-2:][0] in ("error", "warning", "info")}
    missing = sorted(codes - shown)
    assert not missing, f"diagnostic codes without an example in docs/ckp/diagnostics.md: {missing}"
