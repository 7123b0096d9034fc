"""Output mappings (ckp.md §5.6): extract values from a step result or an LLM completion.

:func:`apply_output_mapping` returns ``(value, warnings)``; each warning is a ``template_warning`` reason
(``output_mapping_failed``) the runtime emits as ``template_warning {variable, reason, location}``. Mappings never
fail the step, except a ``template`` mapping whose expression raises at runtime (``expression_error``, as for
any template).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jmespath
import lxml.html
from lxml import etree

from ckp_core.expressions import ExpressionError, MappingScope, Scope, evaluate, format_embedded
from ckp_core.ir import OutputMappingIR
from ckp_core.templates import render
from langorch_runtime.errors import expression_failure
from langorch_runtime.parsers import ParseError, parse_json_text, safe_xml_parser

__all__ = ["OUTPUT_MAPPING_FAILED", "apply_output_mapping"]

OUTPUT_MAPPING_FAILED = "output_mapping_failed"
_NO_SCOPE = MappingScope()
_UNPARSED = object()


def _parsed_json(source: Any) -> Any:
    """The source as JSON: strings are decoded (code fence stripped); other values are already JSON."""
    if isinstance(source, str):
        try:
            return parse_json_text(source)
        except ParseError:
            return _UNPARSED
    return source


def _json_path(m: OutputMappingIR, source: Any) -> tuple[Any, list[str]]:
    data = _parsed_json(source)
    if data is _UNPARSED:
        return None, [OUTPUT_MAPPING_FAILED]
    if m.path is None:
        return data, []
    scope = MappingScope(data) if isinstance(data, Mapping) else _NO_SCOPE
    try:
        return evaluate(m.path.compiled, scope), []
    except ExpressionError:
        return None, [OUTPUT_MAPPING_FAILED]


def _jmespath(m: OutputMappingIR, source: Any) -> tuple[Any, list[str]]:
    data = _parsed_json(source)
    if data is _UNPARSED:
        return None, [OUTPUT_MAPPING_FAILED]
    try:
        return jmespath.search(m.argument or "@", data), []
    except (jmespath.exceptions.JMESPathError, ValueError, TypeError):
        return None, [OUTPUT_MAPPING_FAILED]


def _regex(m: OutputMappingIR, source: Any) -> tuple[Any, list[str]]:
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        regex = re2.compile(m.argument or "", options)
    except re2.error:
        return None, [OUTPUT_MAPPING_FAILED]
    text = source if isinstance(source, str) else format_embedded(source)
    match = regex.search(text)
    if match is None:
        return None, []
    value = match.group(1 if regex.groups > 0 else 0)
    return (None if value is None else str(value)), []


_XML_START = re.compile(r"\s*<")


def _xml_document(text: str) -> Any:
    """The source as an XML tree, else as HTML (lxml.html); ``None`` when neither parses."""
    if _XML_START.match(text):
        try:
            root = etree.fromstring(text.encode("utf-8"), safe_xml_parser())
            docinfo: Any = root.getroottree().docinfo
            if docinfo.internalDTD is None:
                return root
        except (etree.XMLSyntaxError, ValueError):
            pass
    try:
        return lxml.html.document_fromstring(text)
    except (etree.ParserError, etree.XMLSyntaxError, ValueError):
        return None


def _node_text(node: Any) -> Any:
    if isinstance(node, etree._Element):
        return "".join(str(part) for part in node.itertext())
    return str(node)


def _xpath(m: OutputMappingIR, source: Any) -> tuple[Any, list[str]]:
    text = source if isinstance(source, str) else format_embedded(source)
    doc = _xml_document(text)
    if doc is None:
        return None, [OUTPUT_MAPPING_FAILED]
    try:
        result = doc.xpath(m.argument or "")
    except (etree.XPathError, ValueError):
        return None, [OUTPUT_MAPPING_FAILED]
    if isinstance(result, list):
        return (None if not result else _node_text(result[0])), []
    if isinstance(result, (bool, float, int)):
        return result, []
    return str(result), []


def _template(m: OutputMappingIR, source: Any, scope: Scope | None, llm: bool,
              on_unresolved: Callable[[str, str, str], None] | None) -> tuple[Any, list[str]]:
    assert m.template is not None
    if llm and isinstance(source, str):
        parsed = _parsed_json(source)
        result = source if parsed is _UNPARSED else parsed
        text = source
    else:
        result = source
        text = source if isinstance(source, str) else format_embedded(source)
    locals_ = MappingScope({"result": result, "text": text})
    layered = _Layered(locals_, scope) if scope is not None else locals_
    try:
        return render(m.template.compiled, layered, on_unresolved), []
    except ExpressionError as exc:
        raise expression_failure(exc) from None


class _Layered:
    """Locals first, then the caller's scope."""

    def __init__(self, first: Scope, second: Scope) -> None:
        self.first = first
        self.second = second

    def lookup(self, name: str) -> tuple[bool, Any]:
        found, value = self.first.lookup(name)
        return (found, value) if found else self.second.lookup(name)


def apply_output_mapping(m: OutputMappingIR, source: Any, scope: Scope | None = None, *, llm: bool = False,
                         on_unresolved: Callable[[str, str, str], None] | None = None) -> tuple[Any, list[str]]:
    """Apply one output mapping (§5.6) to ``source`` and return ``(value, warnings)``.

    ``source`` is the step result, or the completion text for ``llm_action.outputs`` (``llm=True``: a
    ``template`` mapping's ``result`` is then the parsed JSON of the text, else the text). ``scope`` (variables
    then built-ins) is read by ``template`` mappings after their locals ``result`` and ``text``;
    ``on_unresolved(variable, reason, json_path)`` receives their unresolved paths. ``warnings`` holds
    ``output_mapping_failed`` when the source cannot be parsed for ``json``/``jmespath``/``xpath`` (the value is
    then ``null``). Raises :class:`~langorch_runtime.errors.StepError` ``expression_error`` only for ``template``.
    """
    if m.kind == "text":
        return source, []
    if m.kind == "json":
        return _json_path(m, source)
    if m.kind == "jmespath":
        return _jmespath(m, source)
    if m.kind == "regex":
        return _regex(m, source)
    if m.kind == "xpath":
        return _xpath(m, source)
    return _template(m, source, scope, llm, on_unresolved)
