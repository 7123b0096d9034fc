"""Output mappings (ckp.md §5.6) through ``langorch_runtime.mappings`` with compiled IR."""

from __future__ import annotations

from typing import Any

import pytest

from ckp_core.expressions import MappingScope
from langorch_runtime.errors import StepError
from langorch_runtime.mappings import OUTPUT_MAPPING_FAILED, apply_output_mapping
from runtime_ir_support import output_mapping

pytestmark = pytest.mark.unit

RESULT = {"data": {"items": [{"id": "a", "price": 2.5}, {"id": "b", "price": 4}], "total": 2}, "ok": True}
FENCED = '```json\n{"answer": {"value": 42, "tags": ["x"]}}\n```'
XML = '<?xml version="1.0"?><root><item id="1">First <b>bold</b></item><item id="2">Second</item></root>'
HTML = "<html><body><div class='price'>9.99</div><p>unclosed<br></body></html>"


@pytest.mark.parametrize(("mapping", "source", "expected"), [
    ("text", RESULT, RESULT),
    ("raw", "plain text", "plain text"),
    ("result", None, None),
    ("json:data.total", RESULT, 2),
    ("json: data.items[1].id", RESULT, "b"),
    ("$.data.items[1].price", RESULT, 4),
    ("json_extract:data.items.length", RESULT, 2),
    ("json:answer.value", FENCED, 42),
    ("json:answer.tags[0]", FENCED, "x"),
    ("json:answer.missing", FENCED, None),
    ("json:data.items[5]", RESULT, None),
    ("json:", FENCED, {"answer": {"value": 42, "tags": ["x"]}}),
    ("json:x", '["not", "an object"]', None),
    ("jmespath:data.items[?price > `3`].id", RESULT, ["b"]),
    ("jmespath:answer.value", FENCED, 42),
    ("jmespath:nothing.here", RESULT, None),
    ("regex:total=(\\d+)", "sum total=17 items", "17"),
    ("regex:\\d+", "abc 123 456", "123"),
    ("regex:(x)?y", "y", None),
    ("regex:nomatch", "abc", None),
    ("regex:\"total\":(\\d+)", RESULT, "2"),
    ("xpath://item[@id='2']/text()", XML, "Second"),
    ("xpath://item", XML, "First bold"),
    ("xpath://item/@id", XML, "1"),
    ("xpath:count(//item)", XML, 2.0),
    ("xpath:string(//item[2])", XML, "Second"),
    ("xpath:boolean(//missing)", XML, False),
    ("xpath://missing", XML, None),
    ("xpath://div[@class='price']", HTML, "9.99"),
    ("xpath://p", HTML, "unclosed"),
    ("xpath://p", "<!DOCTYPE html><html><body><p>hi</p></body></html>", "hi"),
])
def test_mappings(mapping: str, source: Any, expected: Any) -> None:
    value, warnings = apply_output_mapping(output_mapping(mapping), source)
    assert value == expected
    assert type(value) is type(expected)
    assert warnings == []


@pytest.mark.parametrize(("mapping", "source"), [
    ("json:a", "{not json"),
    ("json:a", "```json\n{broken\n```"),
    ("$.a", "NaN"),
    ("jmespath:a", "not json at all"),
    ("xpath://a", ""),
    ("xpath://a", "   "),
])
def test_unparsable_sources_warn(mapping: str, source: Any) -> None:
    value, warnings = apply_output_mapping(output_mapping(mapping), source)
    assert value is None
    assert warnings == [OUTPUT_MAPPING_FAILED]


def test_xml_with_entities_is_not_expanded() -> None:
    bomb = '<!DOCTYPE r [<!ENTITY a "AAAAAAAAAA"><!ENTITY b "&a;&a;&a;&a;">]><r>&b;</r>'
    assert apply_output_mapping(output_mapping("xpath://r"), bomb) == ("&b;", [])


def test_template_mapping_with_step_results() -> None:
    m = output_mapping("{{result.data.total * factor}}")
    scope = MappingScope({"factor": 10, "result": "shadowed variable"})
    assert apply_output_mapping(m, RESULT, scope) == (20, [])
    m = output_mapping("{{result.ok}}: {{text}}")
    assert apply_output_mapping(m, {"ok": True}, scope) == ('true: {"ok":true}', [])
    m = output_mapping("{{text}}")
    assert apply_output_mapping(m, '{"a": 1}', scope) == ('{"a": 1}', [])
    m = output_mapping("{{result}}")
    assert apply_output_mapping(m, '{"a": 1}', scope) == ('{"a": 1}', []), "a step's string result stays a string"


def test_template_mapping_with_llm_text() -> None:
    m = output_mapping("{{result.answer.value}}")
    assert apply_output_mapping(m, FENCED, MappingScope(), llm=True) == (42, [])
    m = output_mapping("{{result}}")
    assert apply_output_mapping(m, "not json", MappingScope(), llm=True) == ("not json", [])
    m = output_mapping("{{text}} / {{result.answer.tags}}")
    assert apply_output_mapping(m, FENCED, None, llm=True) == (FENCED + ' / ["x"]', [])


def test_template_mapping_reports_unresolved_and_fails_on_expression_errors() -> None:
    seen: list[tuple[str, str, str]] = []
    m = output_mapping("{{result.nope}}-{{undeclared_thing}}")
    value, warnings = apply_output_mapping(m, {"a": 1}, MappingScope(), on_unresolved=lambda *a: seen.append(a))
    assert (value, warnings) == ("-", [])
    assert seen == [("result", "missing_key", ""), ("undeclared_thing", "undefined", "")]
    m = output_mapping("{{result.a / 0}}")
    with pytest.raises(StepError) as info:
        apply_output_mapping(m, {"a": 1}, MappingScope())
    assert info.value.error.code == "expression_error"
