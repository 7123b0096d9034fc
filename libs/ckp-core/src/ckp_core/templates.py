"""CKP templates (ckp.md §5.1): JSON values whose strings contain ``{{ expr }}`` / ``{{ expr | fallback }}``.

Templates are compiled once (every placeholder parsed into an :class:`~ckp_core.expressions.Expression`) and
rendered type-preserving: a string that is exactly one placeholder yields the value with its JSON type,
anything else is embedded formatting. Rendering is single-pass: inserted values are never scanned again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeAlias

from ckp_core.expressions import (
    Expression,
    ExpressionSyntaxError,
    PlaceholderExpr,
    Scope,
    ast_to_json,
    evaluate,
    expression_from_json,
    format_embedded,
    has_placeholder,
    referenced_roots,
    scan_template,
)

__all__ = [
    "Placeholder",
    "Template",
    "TemplateSyntaxError",
    "compile_template",
    "compile_template_checked",
    "format_embedded",
    "has_placeholder",
    "render",
    "render_text",
    "template_errors",
    "template_from_json",
    "template_to_json",
]

TemplateUnresolvedCallback: TypeAlias = Callable[[str, str, str], None]


class TemplateSyntaxError(Exception):
    """A placeholder whose content does not parse (``template_syntax_error``).

    ``path`` is the JSON Pointer of the string inside the template value ("" for the root), ``placeholder``
    the text between the braces, ``raw`` the whole ``{{…}}`` and ``cause`` the underlying syntax error.
    """

    def __init__(
        self,
        path: str,
        placeholder: str,
        reason: str,
        raw: str = "",
        cause: ExpressionSyntaxError | None = None,
    ) -> None:
        super().__init__(path, placeholder, reason)
        self.path = path
        self.placeholder = placeholder
        self.reason = reason
        self.raw = raw or "{{" + placeholder + "}}"
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.path or '/'}: invalid placeholder '{self.raw}': {self.reason}"


@dataclass(frozen=True)
class Placeholder:
    """One compiled placeholder; ``path`` is the JSON Pointer of its string inside the template."""

    path: str
    expression: Expression
    fallback_set: bool
    fallback: Any
    raw: str


@dataclass(frozen=True)
class _StringTemplate:
    parts: tuple[str | Placeholder, ...]
    whole: Placeholder | None


@dataclass(frozen=True)
class Template:
    """A compiled template: the source JSON value and its placeholders in document order."""

    source: Any
    placeholders: tuple[Placeholder, ...]
    _strings: Mapping[str, _StringTemplate] = field(default_factory=dict, repr=False, compare=False)

    @property
    def referenced_roots(self) -> frozenset[str]:
        """Root names read by any placeholder."""
        out: set[str] = set()
        for ph in self.placeholders:
            out |= ph.expression.referenced_roots
        return frozenset(out)

    @property
    def is_constant(self) -> bool:
        """True when the template has no placeholder (renders to its source)."""
        return not self.placeholders


def _escape_pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _placeholder(path: str, node: PlaceholderExpr) -> Placeholder:
    expression = Expression(node.source, node.expr, referenced_roots(node.expr))
    return Placeholder(path, expression, node.has_fallback, node.fallback, node.raw)


@lru_cache(maxsize=8192)
def _scan(s: str) -> tuple[tuple[str | PlaceholderExpr, ...], tuple[tuple[str, str, ExpressionSyntaxError], ...]]:
    """Scan one template string (cached by content: the trees are immutable)."""
    bad: list[tuple[str, str, ExpressionSyntaxError]] = []
    try:
        nodes = scan_template(s, errors=bad)
    except RecursionError:
        raise TemplateSyntaxError("", "", "placeholder nested too deeply") from None
    return nodes, tuple(bad)


def _compile_string(
    s: str, path: str, errors: list[TemplateSyntaxError] | None
) -> _StringTemplate | None:
    if not has_placeholder(s):
        if "\\{{" in s:
            return _StringTemplate((s.replace("\\{{", "{{"),), None)
        return None
    try:
        nodes, bad = _scan(s)
    except TemplateSyntaxError as deep:
        raise TemplateSyntaxError(path, deep.placeholder, deep.reason) from None
    for inner, raw, cause in bad:
        error = TemplateSyntaxError(path, inner, str(cause), raw, cause)
        if errors is None:
            raise error
        errors.append(error)
    parts = tuple(part if isinstance(part, str) else _placeholder(path, part) for part in nodes)
    placeholders = [part for part in parts if isinstance(part, Placeholder)]
    whole: Placeholder | None = None
    if len(placeholders) == 1 and all(isinstance(p, Placeholder) or not p.strip() for p in parts):
        whole = placeholders[0]
    return _StringTemplate(parts, whole)


def _walk(
    value: Any,
    path: str,
    strings: dict[str, _StringTemplate],
    out: list[Placeholder],
    errors: list[TemplateSyntaxError] | None,
) -> None:
    if isinstance(value, str):
        compiled = _compile_string(value, path, errors)
        if compiled is not None:
            strings[path] = compiled
            out.extend(part for part in compiled.parts if isinstance(part, Placeholder))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _walk(item, f"{path}/{_escape_pointer(str(key))}", strings, out, errors)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _walk(item, f"{path}/{i}", strings, out, errors)


def compile_template(value: Any) -> Template:
    """Compile a template value; raises :class:`TemplateSyntaxError` for the first bad placeholder."""
    strings: dict[str, _StringTemplate] = {}
    out: list[Placeholder] = []
    _walk(value, "", strings, out, None)
    return Template(value, tuple(out), strings)


def compile_template_checked(value: Any) -> tuple[Template | None, list[TemplateSyntaxError]]:
    """Compile a template in one pass, collecting every bad placeholder (template None when there is one)."""
    strings: dict[str, _StringTemplate] = {}
    out: list[Placeholder] = []
    errors: list[TemplateSyntaxError] = []
    _walk(value, "", strings, out, errors)
    if errors:
        return None, errors
    return Template(value, tuple(out), strings), errors


def template_errors(value: Any) -> list[TemplateSyntaxError]:
    """Every bad placeholder of a template value, in document order (empty when it compiles)."""
    errors: list[TemplateSyntaxError] = []
    _walk(value, "", {}, [], errors)
    return errors


def _placeholder_to_json(ph: Placeholder) -> dict[str, Any]:
    return {
        "path": ph.path, "raw": ph.raw, "source": ph.expression.source, "ast": ast_to_json(ph.expression.ast),
        "roots": sorted(ph.expression.referenced_roots), "fallback_set": ph.fallback_set, "fallback": ph.fallback,
    }


def template_to_json(template: Template) -> dict[str, Any]:
    """The IR form of a compiled template (ckp.md §6.6): its source and every compiled string, with the
    placeholders' syntax trees and JSON paths, so that :func:`template_from_json` never parses again."""
    strings = []
    for path, compiled in template._strings.items():
        parts: list[Any] = [
            part if isinstance(part, str) else {"ph": _placeholder_to_json(part)} for part in compiled.parts
        ]
        whole = None
        if compiled.whole is not None:
            whole = next(i for i, part in enumerate(compiled.parts) if part is compiled.whole)
        strings.append({"path": path, "parts": parts, "whole": whole})
    return {"source": template.source, "strings": strings}


def template_from_json(data: Mapping[str, Any]) -> Template:
    """Rebuild a compiled template from :func:`template_to_json` output."""
    strings: dict[str, _StringTemplate] = {}
    out: list[Placeholder] = []
    for entry in data.get("strings", []):
        parts: list[str | Placeholder] = []
        for part in entry["parts"]:
            if isinstance(part, str):
                parts.append(part)
            else:
                ph = part["ph"]
                expression = expression_from_json(ph["source"], ph["ast"], ph["roots"])
                placeholder = Placeholder(ph["path"], expression, ph["fallback_set"], ph["fallback"], ph["raw"])
                parts.append(placeholder)
                out.append(placeholder)
        whole_index = entry.get("whole")
        whole = parts[whole_index] if whole_index is not None else None
        strings[entry["path"]] = _StringTemplate(tuple(parts), whole if isinstance(whole, Placeholder) else None)
    return Template(data.get("source"), tuple(out), strings)


def _value(ph: Placeholder, scope: Scope, on_unresolved: TemplateUnresolvedCallback | None) -> Any:
    callback: Callable[[str, str], None] | None = None
    if on_unresolved is not None:
        report = on_unresolved
        path = ph.path

        def callback(variable: str, reason: str) -> None:
            report(variable, reason, path)

    value = evaluate(ph.expression, scope, callback)
    if value is None and ph.fallback_set:
        return copy.deepcopy(ph.fallback)
    return value


class _Renderer:
    def __init__(
        self,
        template: Template,
        scope: Scope,
        on_unresolved: TemplateUnresolvedCallback | None,
        embedded_only: bool,
    ) -> None:
        self.strings = template._strings
        self.scope = scope
        self.on_unresolved = on_unresolved
        self.embedded_only = embedded_only

    def string(self, s: str, path: str) -> Any:
        compiled = self.strings.get(path)
        if compiled is None:
            if not has_placeholder(s) and "\\{{" not in s:
                return s
            compiled = _compile_string(s, path, None)
            if compiled is None:
                return s
        if compiled.whole is not None and not self.embedded_only:
            value = _value(compiled.whole, self.scope, self.on_unresolved)
            return copy.deepcopy(value) if isinstance(value, (list, dict)) else value
        out: list[str] = []
        for part in compiled.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(format_embedded(_value(part, self.scope, self.on_unresolved)))
        return "".join(out)

    def value(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self.string(value, path)
        if isinstance(value, Mapping):
            return {
                key: self.value(item, f"{path}/{_escape_pointer(str(key))}") for key, item in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.value(item, f"{path}/{i}") for i, item in enumerate(value)]
        return value


def render(
    template: Template, scope: Scope, on_unresolved: TemplateUnresolvedCallback | None = None
) -> Any:
    """Render a compiled template type-preserving (§5.1).

    ``on_unresolved(variable, reason, json_path)`` is called for every unresolved path. Raises
    :class:`~ckp_core.expressions.ExpressionError` for runtime expression errors.
    """
    return _Renderer(template, scope, on_unresolved, embedded_only=False).value(template.source, "")


def render_text(
    template: Template, scope: Scope, on_unresolved: TemplateUnresolvedCallback | None = None
) -> str:
    """Render a template "as a string": strings in embedded mode; other values formatted afterwards."""
    result = _Renderer(template, scope, on_unresolved, embedded_only=True).value(template.source, "")
    return result if isinstance(result, str) else format_embedded(result)
