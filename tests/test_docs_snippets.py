"""Every CKP example in the documentation compiles (or is rejected, or evaluates) exactly as its page says.

A fenced block in ``docs/`` is checked when the line just before its opening fence is a marker comment:

``<!-- ckp: [nodes|step] valid -->``
    The block compiles with no error diagnostics.
``<!-- ckp: [nodes|step] error|warning|info CODE -->``
    The block compiles with a diagnostic of that severity and code (``warning``/``info``: and no error).
``... procedures={"ID": ["CALLED_ID", ...], ...}`` (at the end of either form above)
    The compiler gets a procedure lookup holding exactly these stored procedures, each calling the listed
    procedures as subflows (for ``subflow_not_found`` and ``subflow_recursion`` through other procedures).
    Without it the compiler has no lookup, as in a plain ``validate``.
``<!-- ckp: expressions -->``
    A text block of lines ``EXPRESSION => JSON`` (or ``=> error``): each expression evaluates to that value (or
    raises an expression error, syntax errors included).
``<!-- ckp: templates -->``
    Lines ``TEMPLATE => JSON``: the template (a JSON value on one line) renders to that value; ``=> error`` when
    it does not compile or raises an expression error.
``<!-- ckp: mappings -->``
    Lines ``"MAPPING" => JSON``: the output mapping (a JSON string) compiles and, applied to the current source,
    gives that value. ``# result: JSON`` sets the source to a step result, ``# text: "..."`` to an LLM
    completion text. ``=> error`` when the mapping raises an expression error.
``<!-- ckp: operations -->``
    Lines ``{"action": ..., ...} => RESULT``: the internal operation compiles (as one operation of a
    ``processing`` node), its fields are rendered against the variables and it runs; its writes (and
    ``output_variable``) are applied to the variables, so later lines see them. ``RESULT`` is JSON,
    ``error CODE [REASON]`` (the error's ``code`` and ``details.reason``) or ``matches REGEX`` (the regular
    expression matches the whole result: a string, or the compact JSON text of any other value).
    ``# secrets: {...}`` is the ``secrets`` object the ``key`` field sees; ``# clock: RFC3339`` is the current
    time (default 2025-01-15T09:30:00Z).
``<!-- ckp: transforms -->``
    Lines ``{"type": ..., "output_variable": ..., ...} => RESULT``: the transformation compiles (in a
    ``transform`` node) and gives that result (or ``error CODE [REASON]``), which is written to its
    ``output_variable`` for the next lines.
``<!-- ckp: json -->``
    The block is JSON (a payload or an IR excerpt shown for reading); it must parse.

In every line-based block, ``# vars: {...}`` sets the variables of the lines after it, ``# expect vars: {...}``
asserts them (operations and transforms), other ``#`` lines are comments. Results are compared as JSON with
their types: ``1`` is not ``1.0`` and ``true`` is not ``1``. In ``templates``, ``mappings``, ``operations``
and ``transforms`` a line with a result whose templates leave a path unresolved (the runtime's
``template_warning``) must say so after the result: ``=> null warning undefined`` (reasons comma-separated, in any
order); a result without ``warning`` asserts none (error lines do not check warnings). As in the runtime,
``calculate`` and transform expressions report no unresolved paths.

Without ``nodes``/``step`` the block is a whole CKP document. ``nodes`` is a ``workflow_graph.nodes`` object whose
first node is the start node; ``step`` is one step, placed in a ``sequence`` node that ends in ``terminate``.
In ``docs/ckp/`` every ``json`` block needs a marker, so an example cannot drift from the compiler unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import re2

from ckp_core.compiler import ProcedureLookup, compile_document
from ckp_core.expressions import ExpressionError, ExpressionSyntaxError, MappingScope, evaluate, parse_expression
from ckp_core.ir import ProcedureIR, ProcessingPayload, SequencePayload, SubflowRefIR, TransformPayload
from ckp_core.templates import TemplateSyntaxError, compile_template, render
from langorch_runtime.errors import StepError, expression_failure
from langorch_runtime.mappings import apply_output_mapping
from langorch_runtime.operations import OpContext, apply_writes, run_operation
from langorch_runtime.transforms import run_transformation

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMPILER_SOURCES = sorted((ROOT / "libs" / "ckp-core" / "src" / "ckp_core").rglob("*.py"))
MARKER = re.compile(r"^<!--\s*ckp:\s*(?P<spec>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
DIRECTIVE = re.compile(r"^#\s*(?P<key>vars|expect vars|result|text|secrets|clock):\s*(?P<value>.*)$")
DEFAULT_CLOCK = "2025-01-15T09:30:00Z"
DIRECTIVES: dict[str, frozenset[str]] = {
    "expressions": frozenset({"vars"}),
    "templates": frozenset({"vars"}),
    "mappings": frozenset({"vars", "result", "text"}),
    "operations": frozenset({"vars", "expect vars", "secrets", "clock"}),
    "transforms": frozenset({"vars", "expect vars"}),
}


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


# -- whole documents and fragments -------------------------------------------------------------------------------


def _document(kind: str, data: Any) -> Any:
    if kind == "nodes":
        assert isinstance(data, dict), "a nodes snippet is an object of nodes"
        assert data, "a nodes snippet needs at least one node"
        return {"procedure_id": "doc_snippet", "version": "1.0.0",
                "workflow_graph": {"start_node": next(iter(data)), "nodes": data}}
    if kind == "step":
        return {"procedure_id": "doc_snippet", "version": "1.0.0",
                "workflow_graph": {"start_node": "main", "nodes": {
                    "main": {"type": "sequence", "steps": [data], "next_node": "done"},
                    "done": {"type": "terminate", "status": "success"}}}}
    return data


def _store_lookup(store: dict[str, list[str]]) -> ProcedureLookup:
    """A procedure lookup over ``{procedure_id: [called procedure ids]}`` (every version is the stored one)."""

    def lookup(procedure_id: str, version: str | None) -> list[SubflowRefIR] | None:
        if procedure_id not in store:
            return None
        return [SubflowRefIR(node_id=f"call_{i}", procedure_id=called) for i, called in enumerate(store[procedure_id])]

    return lookup


def _marker_words(spec: str) -> list[str]:
    """The words of a compile marker, without its ``procedures=`` store."""
    return spec.partition(" procedures=")[0].split()


def _check_compile(snippet: Snippet, spec: str) -> None:
    words = _marker_words(spec)
    _, has_store, store_text = spec.partition(" procedures=")
    lookup = None
    if has_store:
        store = json.loads(store_text)
        assert isinstance(store, dict), f"{snippet.where}: procedures= needs an object"
        assert all(isinstance(v, list) for v in store.values()), \
            f"{snippet.where}: procedures= maps procedure ids to lists of the procedure ids they call"
        lookup = _store_lookup(store)
    kind = words.pop(0) if words and words[0] in ("nodes", "step") else "document"
    assert words, f"{snippet.where}: marker needs valid, error CODE, warning CODE or info CODE"
    doc = _document(kind, json.loads(snippet.body))
    result = compile_document(doc, lookup)
    found = [(d.severity, d.code) for d in result.diagnostics]
    errors = [f"{d.code} at {d.path or '/'}: {d.message}" for d in result.errors]
    expect = words[0]
    if expect == "valid":
        assert len(words) == 1, f"{snippet.where}: bad marker {snippet.spec!r}"
        assert not errors, f"{snippet.where}: documented as valid, but: {errors}"
        return
    assert expect in ("error", "warning", "info"), f"{snippet.where}: bad marker {snippet.spec!r}"
    assert len(words) == 2, f"{snippet.where}: bad marker {snippet.spec!r}"
    code = words[1]
    assert (expect, code) in found, f"{snippet.where}: expected {expect} {code}, compiler said {found}"
    if expect != "error":
        assert not errors, f"{snippet.where}: documented as compiling with a {expect}, but: {errors}"


# -- line-based blocks -------------------------------------------------------------------------------------------


@dataclass
class _Lines:
    """The state a line-based block carries from line to line."""

    kind: str
    variables: dict[str, Any] = field(default_factory=dict)
    source: Any = None
    llm: bool = False
    secrets: dict[str, Any] | None = None
    clock: datetime = field(default_factory=lambda: _instant(DEFAULT_CLOCK))


@dataclass(frozen=True)
class _Expected:
    """The right-hand side of a line: a value (with the warnings it must raise), an error, or a pattern."""

    value: Any = None
    warnings: frozenset[str] = frozenset()
    error: tuple[str, ...] | None = None  # () for a bare ``error``, else (code[, reason])
    pattern: str | None = None


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.tzinfo is not None, f"clock {text!r} needs a UTC offset"
    return moment.astimezone(UTC)


def _json_text(value: Any) -> str:
    """JSON text that tells ``1`` from ``1.0`` and ``true`` from ``1`` (object key order ignored)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _parse_expected(text: str, where: str) -> _Expected:
    text = text.strip()
    if text == "error" or text.startswith("error "):
        return _Expected(error=tuple(text.split()[1:]))
    if text.startswith("matches "):
        return _Expected(pattern=text.removeprefix("matches ").strip())
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except ValueError as exc:
        raise AssertionError(f"{where}: the result {text!r} is not JSON, error or matches: {exc}") from None
    rest = text[end:].strip()
    if not rest:
        return _Expected(value=value)
    assert rest.startswith("warning "), f"{where}: unexpected {rest!r} after the result"
    reasons = frozenset(r.strip() for r in rest.removeprefix("warning ").split(","))
    return _Expected(value=value, warnings=reasons)


def _split_line(line: str, where: str) -> tuple[Any, str]:
    """``JSON => RESULT``: the JSON value on the left (it may itself contain ``=>``) and the result text."""
    try:
        value, end = json.JSONDecoder().raw_decode(line)
    except ValueError as exc:
        raise AssertionError(f"{where}: the left side is not JSON: {exc}") from None
    rest = line[end:].lstrip()
    assert rest.startswith("=>"), f"{where}: expected '=>' after the JSON value"
    return value, rest[2:]


def _lines(snippet: Snippet, state: _Lines) -> Iterator[tuple[str, str]]:
    """The block's ``(where, line)`` pairs with directives applied to ``state`` on the way."""
    for n, raw in enumerate(snippet.body.splitlines(), snippet.line + 1):
        line = raw.strip()
        where = f"{snippet.page.relative_to(ROOT)}:{n}"
        if not line:
            continue
        directive = DIRECTIVE.match(line)
        if directive is not None:
            key, value = directive["key"], directive["value"]
            assert key in DIRECTIVES[state.kind], f"{where}: '# {key}:' is not used in a {state.kind} block"
            if key == "clock":
                state.clock = _instant(value.strip())
                continue
            data = json.loads(value)
            if key == "vars":
                assert isinstance(data, dict), f"{where}: '# vars:' needs an object"
                state.variables = data
            elif key == "expect vars":
                assert _json_text(state.variables) == _json_text(data), \
                    f"{where}: documented variables {data!r}, but they are {state.variables!r}"
            elif key == "result":
                state.source, state.llm = data, False
            elif key == "text":
                assert isinstance(data, str), f"{where}: '# text:' needs a JSON string"
                state.source, state.llm = data, True
            elif key == "secrets":
                assert isinstance(data, dict), f"{where}: '# secrets:' needs an object"
                state.secrets = data
            continue
        if line.startswith("#"):
            continue
        yield where, line


def _compare(where: str, expected: _Expected, got: Any, warnings: list[str]) -> None:
    assert expected.error is None, f"{where}: documented as an error, but it gives {got!r}"
    if expected.pattern is not None:
        text = got if isinstance(got, str) else json.dumps(got, separators=(",", ":"), ensure_ascii=False)
        assert re2.fullmatch(expected.pattern, text), \
            f"{where}: documented as matching {expected.pattern!r}, but it gives {text!r}"
    else:
        assert _json_text(got) == _json_text(expected.value), \
            f"{where}: documented {expected.value!r}, but it gives {got!r}"
    assert set(warnings) == set(expected.warnings), \
        f"{where}: documented warnings {sorted(expected.warnings)}, but it raises {sorted(set(warnings))}"


def _compare_error(where: str, expected: _Expected, error: StepError) -> None:
    code, reason = error.error.code, error.error.details.get("reason")
    if expected.error is None:
        raise AssertionError(f"{where}: documented as a result, but it fails with {code} ({reason}): "
                             f"{error.error.message}")
    actual = (code, reason) if reason is not None else (code,)
    assert expected.error == actual[:len(expected.error)], \
        f"{where}: documented error {' '.join(expected.error)!r}, but it fails with {' '.join(map(str, actual))}"


def _compiled(where: str, node: dict[str, Any]) -> ProcedureIR:
    doc = _document("nodes", {"node": node, "done": {"type": "terminate"}})
    result = compile_document(doc)
    assert result.ir is not None, f"{where}: does not compile: " + "; ".join(
        f"{d.code} at {d.path}: {d.message}" for d in result.errors)
    return result.ir


class _Warnings(list[str]):
    """Collects the reasons of unresolved paths (what the runtime reports as ``template_warning``)."""

    def rendering(self, _variable: str, reason: str, _path: str) -> None:
        self.append(reason)


def _expression_line(state: _Lines, where: str, line: str) -> None:
    source, sep, expected = line.partition(" => ")
    assert sep, f"{where}: expected 'EXPRESSION => RESULT'"
    at = f"{where}: {source}"
    if expected.strip() == "error":
        with pytest.raises((ExpressionError, ExpressionSyntaxError)):
            evaluate(parse_expression(source), MappingScope(state.variables))
        return
    got = evaluate(parse_expression(source), MappingScope(state.variables))
    want = json.loads(expected)
    assert _json_text(got) == _json_text(want), f"{at}: documented {want!r}, evaluates to {got!r}"


def _template_line(state: _Lines, where: str, line: str) -> None:
    template, rest = _split_line(line, where)
    expected = _parse_expected(rest, where)
    warnings = _Warnings()
    if expected.error is not None:
        assert expected.error == (), f"{where}: a template error is written '=> error'"
        with pytest.raises((TemplateSyntaxError, ExpressionError)):
            render(compile_template(template), MappingScope(state.variables), warnings.rendering)
        return
    got = render(compile_template(template), MappingScope(state.variables), warnings.rendering)
    _compare(where, expected, got, warnings)


def _mapping_line(state: _Lines, where: str, line: str) -> None:
    mapping, rest = _split_line(line, where)
    expected = _parse_expected(rest, where)
    node = {"type": "sequence", "next_node": "done", "steps": [
        {"step_id": "s", "action": "log", "message": "x", "output_mapping": {"out": mapping}}]}
    payload = _compiled(where, node).nodes["node"].payload
    assert isinstance(payload, SequencePayload)
    warnings = _Warnings()
    try:
        got, reasons = apply_output_mapping(payload.steps[0].output_mapping["out"], state.source,
                                            MappingScope(state.variables), llm=state.llm,
                                            on_unresolved=warnings.rendering)
    except StepError as exc:
        _compare_error(where, expected, exc)
    else:
        _compare(where, expected, got, warnings + reasons)


async def _no_sleep(_seconds: float) -> None:
    return None


def _operation_line(state: _Lines, where: str, line: str) -> None:
    raw, rest = _split_line(line, where)
    expected = _parse_expected(rest, where)
    payload = _compiled(where, {"type": "processing", "next_node": "done", "operations": [raw]}).nodes["node"].payload
    assert isinstance(payload, ProcessingPayload)
    op = payload.operations[0]
    warnings = _Warnings()
    scope = MappingScope(state.variables)
    rendering = MappingScope({"secrets": state.secrets}, state.variables) if state.secrets is not None else scope
    clock = state.clock
    try:
        params = render(op.params.compiled, rendering, warnings.rendering)
        # as in the runtime: unresolved paths of a ``calculate`` expression raise no template_warning
        ctx = OpContext(node_id="node", sleep=_no_sleep, clock=lambda: clock, scope=scope)
        outcome = asyncio.run(run_operation(op, params, state.variables, ctx))
    except StepError as exc:
        _compare_error(where, expected, exc)
    except ExpressionError as exc:  # a field's placeholder failed: the runtime fails the node with it
        _compare_error(where, expected, expression_failure(exc))
    else:
        _compare(where, expected, outcome.result, warnings)
        writes = dict(outcome.writes)
        if op.output_variable:
            writes[op.output_variable] = outcome.result
        apply_writes(state.variables, writes)


def _transform_line(state: _Lines, where: str, line: str) -> None:
    raw, rest = _split_line(line, where)
    expected = _parse_expected(rest, where)
    node = {"type": "transform", "next_node": "done", "transformations": [raw]}
    payload = _compiled(where, node).nodes["node"].payload
    assert isinstance(payload, TransformPayload)
    t = payload.transformations[0]
    warnings = _Warnings()
    scope = MappingScope(state.variables)
    try:
        params = render(t.params.compiled, scope, warnings.rendering)
        got = run_transformation(t, params, scope)  # as in the runtime: expressions raise no template_warning
    except StepError as exc:
        _compare_error(where, expected, exc)
    except ExpressionError as exc:
        _compare_error(where, expected, expression_failure(exc))
    else:
        _compare(where, expected, got, warnings)
        state.variables[t.output_variable] = got


LINE_CHECKS: dict[str, Callable[[_Lines, str, str], None]] = {
    "expressions": _expression_line,
    "templates": _template_line,
    "mappings": _mapping_line,
    "operations": _operation_line,
    "transforms": _transform_line,
}


def _check_lines(snippet: Snippet, kind: str) -> None:
    state = _Lines(kind)
    checked = 0
    for where, line in _lines(snippet, state):
        LINE_CHECKS[kind](state, where, line)
        checked += 1
    assert checked, f"{snippet.where}: a {kind} block without a single line to check"


@pytest.mark.parametrize("snippet", MARKED, ids=[s.where for s in MARKED])
def test_documented_snippet_behaves_as_its_page_says(snippet: Snippet) -> None:
    spec = snippet.spec or ""
    words = spec.split()
    assert words, f"{snippet.where}: empty ckp marker"
    if words[0] in LINE_CHECKS:
        assert len(words) == 1, f"{snippet.where}: bad marker {spec!r}"
        _check_lines(snippet, words[0])
    elif words[0] == "json":
        json.loads(snippet.body)
    else:
        _check_compile(snippet, spec)


def test_every_json_block_of_the_language_reference_is_checked() -> None:
    unmarked = [s.where for s in ALL if s.page.is_relative_to(DOCS / "ckp") and s.lang == "json" and s.spec is None]
    assert not unmarked, f"json blocks without a <!-- ckp: ... --> marker: {unmarked}"


def _compiler_codes() -> set[str]:
    codes: set[str] = set()
    for source in COMPILER_SOURCES:
        text = source.read_text(encoding="utf-8")
        codes |= set(re.findall(r"\.add\(\s*(?:\"(?:error|warning|info)\"|\w+),\s*\"([a-z_]+)\"", text))
        codes |= set(re.findall(r"code=\"([a-z_]+)\"", text))
        # expression syntax errors reported under their own code (``_expression_code``)
        codes |= set(re.findall(r"\"\w+Error\":\s*\"([a-z_]+)\"", text))
    return codes


def test_every_diagnostic_code_has_a_documented_example() -> None:
    codes = _compiler_codes()
    assert len(codes) > 40, f"the code scan found only {sorted(codes)}; has the compiler's reporting changed?"
    shown = {_marker_words(s.spec)[-1] for s in MARKED if s.page == DOCS / "ckp" / "diagnostics.md" and s.spec
             and _marker_words(s.spec)[-2:][0] in ("error", "warning", "info")}
    missing = sorted(codes - shown)
    assert not missing, f"diagnostic codes without an example in docs/ckp/diagnostics.md: {missing}"
