"""Expressions and templates: compiled, with what they reference recorded on the compilation.

Every variable an expression or a placeholder reads is noted for the undeclared-variable check; ``secrets``
references are allowed only where the caller says so (§7.14) and noted for the undeclared-alias check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ckp_core.compiler.fields import Compilation
from ckp_core.expressions import (
    Access,
    Const,
    ExpressionSyntaxError,
    Index,
    Member,
    Name,
    PlaceholderExpr,
    ast_to_json,
    parse_expression,
)
from ckp_core.expressions import Node as AstNode
from ckp_core.ir import ExpressionIR, SecretRefIR, TemplateIR, construct
from ckp_core.templates import TemplateSyntaxError, compile_template_checked, template_to_json


def expression(c: Compilation, source: Any, path: str, check_roots: bool = True,
               local_names: frozenset[str] = frozenset()) -> ExpressionIR | None:
    if type(source) is not str and not c.expect(source, (str,), "string", path):
        return None
    try:
        expr = parse_expression(source)
    except ExpressionSyntaxError as exc:
        c.add("error", _expression_code(exc), f"{path}: {exc}", path)
        return None
    except RecursionError:
        c.add("error", "expression_syntax_error", f"{path}: expression nested too deeply", path)
        return None
    if "secrets" in expr.referenced_roots:  # the roots hold every name of the tree
        uses: list[tuple[str | None, str | None]] = []
        _secret_uses(expr.ast, uses)
        if uses:
            c.add("error", "secret_not_allowed", f"{path}: secrets may only be used in agent parameters and "
                  "encryption keys", path)
            return None
    if check_roots:
        for root in sorted(expr.referenced_roots - local_names):  # in one order whatever the hash seed
            c.reads.append((root, path, c.node_id, c.step_id))
    return _expression_ir(source)


@lru_cache(maxsize=2048)
def _expression_ir(source: str) -> ExpressionIR:
    """The IR of an expression that parses (cached by text like the parser: the IR is immutable)."""
    expr = parse_expression(source)
    return ExpressionIR(source=source, ast=ast_to_json(expr.ast), roots=sorted(expr.referenced_roots))


def path_expression(c: Compilation, source: Any, path: str, check_roots: bool = True) -> ExpressionIR | None:
    """An expression that must be a path (§5.2): ``name{.segment|[index]}``."""
    expr = expression(c, source, path, check_roots)
    if expr is None:
        return None
    if not _is_path(expr.compiled.ast):
        c.add("error", "expression_syntax_error", f"{path}: '{source}' is not a path (name.segment[index])",
              path)
        return None
    return expr


def template(c: Compilation, value: Any, path: str, secrets: str | frozenset[str] = "deny",
             local_names: frozenset[str] = frozenset(),
             secret_refs: list[SecretRefIR] | None = None) -> TemplateIR | None:
    """Compile a template field. ``secrets`` (§7.14): ``deny``, ``allow`` (agent parameters) or the set of
    top-level keys where they are allowed (``{"key"}`` for encrypt/decrypt/hash)."""
    strings: list[dict[str, Any]] = []
    found: list[tuple[str, _String]] = []
    errors: list[tuple[str, str, str]] = []
    try:
        if type(value) is dict:  # (most templates: an operation's or a step's parameters)
            _walk_object(value, "", strings, found, errors)
        else:
            _walk_template(value, "", strings, found, errors)
    except (RecursionError, TemplateSyntaxError):
        c.add("error", "template_syntax_error", f"{path}: template nested too deeply", path)
        return None
    for at, raw, reason in errors:
        where = path + at
        c.add("error", "template_syntax_error", f"{where}: invalid placeholder '{raw}': {reason}", where)
    if errors:
        return None
    ok = True
    string_read = c.string_reads.append
    node_id, step_id = c.node_id, c.step_id
    for at, compiled in found:
        if compiled.secret_uses or local_names:
            ok = _placeholder_uses(c, compiled, at, path + at, secrets, local_names, secret_refs) and ok
        elif compiled.reads:  # (most strings: the reads of each placeholder in turn, noted at once)
            string_read((compiled.reads, path, at, node_id, step_id))
    if not ok:
        return None
    if isinstance(value, str):
        return _string_template(value)
    # The entries are shared with the cache of each string's entry at its path: the IR is immutable.
    return construct(TemplateIR, {"source": value, "strings": strings})


def _placeholder_uses(c: Compilation, compiled: _String, at: str, where: str, secrets: str | frozenset[str],
                      local_names: frozenset[str], secret_refs: list[SecretRefIR] | None) -> bool:
    """The variables and secrets the placeholders of a string at ``at`` (``where`` in the document) use, one
    placeholder at a time: whether its secrets are allowed there."""
    ok = True
    node_id, step_id = c.node_id, c.step_id
    for ph in compiled.placeholders:
        uses = ph.secret_uses
        if uses:
            if not (secrets == "allow" or (
                    isinstance(secrets, frozenset) and at.split("/")[1:2] and at.split("/")[1] in secrets)):
                c.add("error", "secret_not_allowed", f"{where}: secrets may only be used in agent parameters "
                      "and encryption keys", where)
                ok = False
                continue
            for alias, fld in uses:
                if alias is None:
                    c.add("error", "secret_not_allowed", f"{where}: secrets must be referenced as "
                          "secrets.<alias>[.<field>]", where)
                    ok = False
                    continue
                c.secret_uses.append((alias, where, node_id, step_id))
                if secret_refs is not None:
                    secret_refs.append(SecretRefIR(alias=alias, field=fld, path=where))
        for root in ph.reads if not local_names else sorted(ph.roots - local_names - {"secrets"}):
            c.reads.append((root, where, node_id, step_id))
    return ok


@dataclass(frozen=True, slots=True)
class _Placeholder:
    """A placeholder of a template string, as compiled by :mod:`ckp_core.templates`, without its JSON path."""

    ir: dict[str, Any]  # its IR form (templates.template_to_json) without "path"
    roots: frozenset[str]
    reads: tuple[str, ...]  # the roots but secrets, in the order of the set difference made for a use
    secret_uses: tuple[tuple[str | None, str | None], ...]


@dataclass(frozen=True, slots=True)
class _String:
    """A template string with a placeholder or an escaped ``\\{{``, compiled once per text."""

    parts: tuple[str | _Placeholder, ...]
    placeholders: tuple[_Placeholder, ...]
    whole: int | None
    errors: tuple[tuple[str, str], ...]  # (raw placeholder, reason) of each one that does not parse
    reads: tuple[str, ...] = ()  # the reads of its placeholders, one after the other
    secret_uses: bool = False  # whether a placeholder uses secrets


@lru_cache(maxsize=8192)
def _compiled_string(s: str) -> _String:
    """Compile one template string (cached by text: templates compile each string independently of where it
    is, so only the JSON path differs between uses). Raises what :func:`compile_template_checked` raises."""
    tpl, bad = compile_template_checked(s)
    if tpl is None:
        return _String((), (), None, tuple((e.raw, e.reason) for e in bad))
    (entry,) = template_to_json(tpl)["strings"]
    placeholders = iter(tpl.placeholders)
    parts: list[str | _Placeholder] = []
    for part in entry["parts"]:
        if isinstance(part, str):
            parts.append(part)
            continue
        expr = next(placeholders).expression
        uses: list[tuple[str | None, str | None]] = []
        if "secrets" in expr.referenced_roots:
            _secret_uses(expr.ast, uses)
        ir = {k: v for k, v in part["ph"].items() if k != "path"}
        reads = tuple(sorted(expr.referenced_roots - {"secrets"}))  # in one order whatever the hash seed
        parts.append(_Placeholder(ir, expr.referenced_roots, reads, tuple(uses)))
    compiled = tuple(p for p in parts if isinstance(p, _Placeholder))
    return _String(tuple(parts), compiled, entry["whole"], (), tuple(root for p in compiled for root in p.reads),
                   any(p.secret_uses for p in compiled))


@lru_cache(maxsize=8192)
def _string_use(s: str, at: str) -> tuple[_String, dict[str, Any] | None]:
    """A template string compiled, and its IR entry at a JSON path when it compiles (the entries and their
    parts are shared by the uses of the text at that path: the IR is immutable)."""
    compiled = _compiled_string(s)
    if compiled.errors:
        return compiled, None
    parts = [part if isinstance(part, str) else {"ph": {"path": at, **part.ir}} for part in compiled.parts]
    return compiled, {"path": at, "parts": parts, "whole": compiled.whole}


@lru_cache(maxsize=4096)
def _string_template(s: str) -> TemplateIR:
    """The IR of a template that is one string that compiles."""
    strings: list[dict[str, Any]] = []
    _walk_template(s, "", strings, [], [])
    return TemplateIR(source=s, strings=strings)


_SCALARS = frozenset({int, float, bool, type(None)})  # nothing to walk in them


def _walk_template(value: Any, at: str, strings: list[dict[str, Any]],
                   found: list[tuple[str, _String]], errors: list[tuple[str, str, str]]) -> None:
    """The compiled strings of a template value in document order (as :func:`compile_template_checked`)."""
    if isinstance(value, str):
        if "{{" in value:  # a placeholder or an escaped one
            _walk_string(value, at, strings, found, errors)
    elif isinstance(value, dict):
        _walk_object(value, at, strings, found, errors)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, str) and "{{" not in item:
                continue
            _walk_template(item, f"{at}/{i}", strings, found, errors)
    elif value is not None and not isinstance(value, (int, float)) and isinstance(value, Mapping):
        _walk_object(value, at, strings, found, errors)  # (the Mapping ABC last: isinstance with it is slow)


def _walk_string(value: str, at: str, strings: list[dict[str, Any]],
                 found: list[tuple[str, _String]], errors: list[tuple[str, str, str]]) -> None:
    compiled, entry = _string_use(value, at)
    if entry is None:
        errors.extend((at, raw, reason) for raw, reason in compiled.errors)
        return
    strings.append(entry)
    if compiled.placeholders:
        found.append((at, compiled))


def _walk_object(value: Mapping[Any, Any], at: str, strings: list[dict[str, Any]],
                 found: list[tuple[str, _String]], errors: list[tuple[str, str, str]]) -> None:
    for key, item in value.items():
        kind = type(item)
        if (kind is str and "{{" not in item) or kind in _SCALARS:  # most values: nothing to walk
            continue
        k = str(key)
        if "~" in k or "/" in k:
            k = k.replace("~", "~0").replace("/", "~1")
        if kind is str:
            _walk_string(item, f"{at}/{k}", strings, found, errors)
        else:
            _walk_template(item, f"{at}/{k}", strings, found, errors)


def opt_template(c: Compilation, obj: Mapping[str, Any], key: str, path: str, **kw: Any) -> TemplateIR | None:
    if key not in obj:
        return None
    return template(c, obj[key], f"{path}/{key}", **kw)


def _expression_code(exc: ExpressionSyntaxError) -> str:
    return {
        "UnknownFunctionError": "unknown_function",
        "FunctionArityError": "function_arity",
        "InvalidRegexError": "invalid_regex",
    }.get(type(exc).__name__, "expression_syntax_error")


def _secret_uses(node: Any, out: list[tuple[str | None, str | None]]) -> None:
    """Collect ``secrets.<alias>[.<field>]`` reads of a syntax tree (alias None: not a literal reference)."""
    if isinstance(node, Access) and isinstance(node.base, Name) and node.base.name == "secrets":
        accs = node.accessors
        alias = _literal_key(accs[0]) if accs else None
        fld = _literal_key(accs[1]) if len(accs) > 1 else None
        out.append((alias, fld))
        for acc in accs:
            if isinstance(acc, Index):
                _secret_uses(acc.expr, out)
        return
    if isinstance(node, Name):
        if node.name == "secrets":
            out.append((None, None))
        return
    if isinstance(node, tuple):
        for item in node:
            _secret_uses(item, out)
        return
    if hasattr(node, "__dataclass_fields__"):
        for name in node.__dataclass_fields__:
            _secret_uses(getattr(node, name), out)


def _literal_key(acc: Any) -> str | None:
    if isinstance(acc, Member):
        return str(acc.key)
    if isinstance(acc, Index) and isinstance(acc.expr, Const) and isinstance(acc.expr.value, str):
        return acc.expr.value
    return None


def _is_path(node: AstNode) -> bool:
    if isinstance(node, Name):
        return True
    if isinstance(node, Access) and isinstance(node.base, Name):
        return all(isinstance(a, Member) or (isinstance(a, Index) and isinstance(a.expr, Const))
                   for a in node.accessors)
    if isinstance(node, PlaceholderExpr) and not node.has_fallback:
        return _is_path(node.expr)
    return False
