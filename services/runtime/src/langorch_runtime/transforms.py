"""Transform node transformations (ckp.md §3.14): filter, map, reduce, join, aggregate, pivot, sort, deduplicate.

:func:`run_transformation` is pure: it reads the source list through the caller's scope, evaluates per-item
expressions in an :class:`ItemScope` and returns the value for ``output_variable``. Failures raise
:class:`~langorch_runtime.errors.StepError` (``operation_failed`` with ``details.reason``, or
``expression_error``) with ``details.index`` (the transformation's position) and ``details.type``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ckp_core.expressions import (
    Access,
    Const,
    Expression,
    ExpressionError,
    ExpressionSyntaxError,
    Index,
    MappingScope,
    Member,
    Name,
    Scope,
    evaluate,
    format_embedded,
    json_type_name,
    parse_expression,
    truthy,
)
from ckp_core.ir import AggregateIR, TransformationIR
from langorch_runtime.errors import StepError, expression_failure, failure
from langorch_runtime.parsers import canonical_json

__all__ = ["ItemScope", "field_value", "run_transformation"]

UnresolvedCallback = Callable[[str, str], None]
_EMPTY: Mapping[str, Any] = {}


class ItemScope:
    """The scope of a per-item transform expression (§3.14, §5.3).

    Resolution order for a root name: the locals (``item``, ``index``, ``acc``), then the fields of ``item`` when
    it is an object, then ``base`` (variables, then built-ins).
    """

    def __init__(self, base: Scope, locals_: Mapping[str, Any]) -> None:
        self.base = base
        self.locals = locals_
        item = locals_.get("item")
        self.fields: Mapping[str, Any] = item if isinstance(item, Mapping) else _EMPTY

    def lookup(self, name: str) -> tuple[bool, Any]:
        if name in self.locals:
            return True, self.locals[name]
        if name in self.fields:
            return True, self.fields[name]
        return self.base.lookup(name)


# -- field references (paths into each item) -------------------------------------------------------------------


class _FieldRef:
    """A ``params`` field reference: a §5.2 path evaluated with the item's fields as roots."""

    def __init__(self, param: str, text: Any) -> None:
        if not isinstance(text, str) or not text.strip():
            raise failure("invalid_value", f"params.{param} must be a field path, got {json_type_name(text)}",
                          field=param)
        self.text = text.strip()
        self.expression: Expression | None = None
        try:
            parsed = parse_expression(self.text)
        except ExpressionSyntaxError:
            parsed = None
        if parsed is not None and (isinstance(parsed.ast, Name) or (
                isinstance(parsed.ast, Access) and isinstance(parsed.ast.base, Name))):
            self.expression = parsed
        self.name = self._last_segment()

    def _last_segment(self) -> str:
        if self.expression is None:
            return self.text
        node = self.expression.ast
        if isinstance(node, Name):
            return node.name
        if not isinstance(node, Access):
            return self.text
        last = node.accessors[-1]
        if isinstance(last, Member):
            return str(last.key)
        if isinstance(last, Index) and isinstance(last.expr, Const) and isinstance(last.expr.value, (str, int)):
            return str(last.expr.value)
        return self.text

    def value(self, item: Any) -> Any:
        """The field's value in ``item`` (a literal key first, else the path); unresolved → ``None``."""
        if not isinstance(item, Mapping):
            return None
        if self.text in item:
            return item[self.text]
        if self.expression is None:
            return None
        try:
            return evaluate(self.expression, MappingScope(item))
        except ExpressionError:
            return None


def field_value(item: Any, path: str) -> Any:
    """Resolve a field path (§5.2) inside one item; unresolved → ``None``."""
    return _FieldRef("field", path).value(item)


# -- helpers ---------------------------------------------------------------------------------------------------


class _Run:
    def __init__(self, t: TransformationIR, params: Mapping[str, Any], scope: Scope,
                 on_unresolved: UnresolvedCallback | None) -> None:
        self.t = t
        self.params = params
        self.scope = scope
        self.on_unresolved = on_unresolved

    def source(self) -> list[Any]:
        if self.t.source_variable is None:
            return []
        try:
            value = evaluate(self.t.source_variable.compiled, self.scope, self.on_unresolved)
        except ExpressionError as exc:
            raise expression_failure(exc) from None
        if value is None:
            return []
        if not isinstance(value, list):
            raise failure("source_not_a_list", f"source '{self.t.source_variable.source}' is "
                          f"{json_type_name(value)}, not a list")
        return value

    def each(self, item: Any, index: int, acc: Any = None, with_acc: bool = False) -> Any:
        assert self.t.expression is not None
        locals_: dict[str, Any] = {"item": item, "index": index}
        if with_acc:
            locals_["acc"] = acc
        try:
            return evaluate(self.t.expression.compiled, ItemScope(self.scope, locals_), self.on_unresolved)
        except ExpressionError as exc:
            raise expression_failure(exc, item_index=index) from None

    def need_expression(self) -> None:
        if self.t.expression is None:
            raise failure("invalid_value", f"{self.t.type} needs an expression", field="expression")

    def bool_param(self, name: str, default: bool) -> bool:
        value = self.params.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise failure("invalid_value", f"params.{name} must be a boolean, got {json_type_name(value)}", field=name)

    def keys(self, items: list[Any]) -> list[Any]:
        """Per-item keys: the expression when given, else ``params.key``, else the item itself."""
        if self.t.expression is not None:
            return [self.each(item, i) for i, item in enumerate(items)]
        if self.params.get("key") is not None:
            ref = _FieldRef("key", self.params["key"])
            return [ref.value(item) for item in items]
        return list(items)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(values: list[Any], what: str) -> list[int | float]:
    for v in values:
        if not _is_number(v):
            raise failure("non_numeric", f"{what} needs numbers, got {json_type_name(v)}",
                          value_type=json_type_name(v))
    return values


def _aggregate(function: str, values: list[Any], what: str) -> Any:
    """``count``, ``sum``, ``avg``, ``min``, ``max`` over the non-null ``values`` (§3.14)."""
    present = [v for v in values if v is not None]
    if function == "count":
        return len(present)
    nums = _numbers(present, what)
    if function == "sum":
        return sum(nums) if nums else 0
    if not nums:
        return None
    if function == "avg":
        return sum(nums) / len(nums)
    return min(nums) if function == "min" else max(nums)


def _group(items: list[Any], key_of: Callable[[Any], Any]) -> list[tuple[Any, list[Any]]]:
    """Groups in first-seen order; keys compared by canonical JSON."""
    groups: dict[str, tuple[Any, list[Any]]] = {}
    for item in items:
        key = key_of(item)
        groups.setdefault(_canonical(key), (key, []))[1].append(item)
    return list(groups.values())


def _canonical(value: Any) -> str:
    try:
        return canonical_json(_json_number_form(value))
    except (TypeError, ValueError):
        return repr(value)


def _json_number_form(value: Any) -> Any:
    """JSON has one number type: ``1`` and ``1.0`` are the same value, so an integral float compares as its integer
    (booleans stay booleans; ``true`` is not ``1``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _json_number_form(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_number_form(v) for v in value]
    return value


# -- the transformations ---------------------------------------------------------------------------------------


def _filter(r: _Run) -> Any:
    r.need_expression()
    return [item for i, item in enumerate(r.source()) if truthy(r.each(item, i))]


def _map(r: _Run) -> Any:
    r.need_expression()
    return [r.each(item, i) for i, item in enumerate(r.source())]


def _reduce(r: _Run) -> Any:
    r.need_expression()
    acc = r.params.get("initial")
    for i, item in enumerate(r.source()):
        acc = r.each(item, i, acc, with_acc=True)
    return acc


def _join(r: _Run) -> Any:
    separator = r.params.get("separator", ", ")
    sep = ", " if separator is None else format_embedded(separator)
    items = r.source()
    values = [r.each(item, i) for i, item in enumerate(items)] if r.t.expression is not None else items
    return sep.join(format_embedded(v) for v in values)


def _aggregate_row(aggregates: list[AggregateIR], items: list[Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for agg in aggregates:
        if agg.field is None:
            row[agg.name] = len(items)
            continue
        ref = _FieldRef("expression", agg.field)
        row[agg.name] = _aggregate(agg.function, [ref.value(item) for item in items], f"{agg.function}({agg.field})")
    return row


def _aggregate_transform(r: _Run) -> Any:
    if not r.t.aggregates:
        raise failure("invalid_value", "aggregate needs an aggregate list", field="expression")
    items = r.source()
    group_by = r.params.get("group_by")
    if group_by is None:
        return _aggregate_row(r.t.aggregates, items)
    ref = _FieldRef("group_by", group_by)
    out: list[Any] = []
    for key, members in _group(items, ref.value):
        out.append({ref.name: key, **_aggregate_row(r.t.aggregates, members)})
    return out


_PIVOT_AGGREGATES = ("first", "last", "count", "sum", "avg", "min", "max")


def _pivot(r: _Run) -> Any:
    index = _FieldRef("index", r.params.get("index"))
    columns = _FieldRef("columns", r.params.get("columns"))
    values = _FieldRef("values", r.params.get("values"))
    how = r.params.get("aggregate", "first")
    how = "first" if how is None else how
    if how not in _PIVOT_AGGREGATES:
        raise failure("invalid_value", f"params.aggregate must be one of {', '.join(_PIVOT_AGGREGATES)}, "
                      f"got {how!r}", field="aggregate")
    rows: dict[str, tuple[Any, dict[str, list[Any]]]] = {}
    for item in r.source():
        key = index.value(item)
        cells = rows.setdefault(_canonical(key), (key, {}))[1]
        cells.setdefault(format_embedded(columns.value(item)), []).append(values.value(item))
    out: list[Any] = []
    for key, cells in rows.values():
        row: dict[str, Any] = {index.name: key}
        for column, cell in cells.items():
            present = [v for v in cell if v is not None]
            if how == "first":
                row[column] = present[0] if present else None
            elif how == "last":
                row[column] = present[-1] if present else None
            else:
                row[column] = _aggregate(how, cell, f"pivot {how}")
        out.append(row)
    return out


def _sort_kind(value: Any) -> str:
    if _is_number(value):
        return "number"
    if isinstance(value, (str, bool)):
        return json_type_name(value)
    return "unorderable"


def _sort(r: _Run) -> Any:
    if r.t.expression is None and r.params.get("key") is None:
        raise failure("invalid_value", "sort needs params.key or an expression", field="key")
    descending = r.bool_param("descending", False)
    items = r.source()
    keys = r.keys(items)
    present = [(k, item) for k, item in zip(keys, items, strict=True) if k is not None]
    missing = [item for k, item in zip(keys, items, strict=True) if k is None]
    kinds = {_sort_kind(k) for k, _ in present}
    if "unorderable" in kinds or len(kinds) > 1:
        raise failure("incomparable_keys", f"sort keys have incomparable types: {', '.join(sorted(kinds))}",
                      key_types=sorted({json_type_name(k) for k, _ in present}))
    ordered = sorted(present, key=lambda pair: pair[0], reverse=descending)
    return [item for _, item in ordered] + missing


def _deduplicate(r: _Run) -> Any:
    items = r.source()
    seen: set[str] = set()
    out: list[Any] = []
    for key, item in zip(r.keys(items), items, strict=True):
        marker = _canonical(key)
        if marker not in seen:
            seen.add(marker)
            out.append(item)
    return out


_TRANSFORMS: dict[str, Callable[[_Run], Any]] = {
    "filter": _filter,
    "map": _map,
    "reduce": _reduce,
    "join": _join,
    "aggregate": _aggregate_transform,
    "pivot": _pivot,
    "sort": _sort,
    "deduplicate": _deduplicate,
}


def run_transformation(t: TransformationIR, params: Mapping[str, Any], scope: Scope | Mapping[str, Any],
                       builtins: Mapping[str, Any] | None = None,
                       on_unresolved: UnresolvedCallback | None = None) -> Any:
    """Apply one transformation (§3.14) and return the value for ``t.output_variable``.

    ``params`` is ``t.params`` rendered (§5.1). ``scope`` reads variables then built-ins: either a
    :class:`~ckp_core.expressions.Scope` or the variables mapping (then ``builtins`` is layered under it).
    ``on_unresolved(root, reason)`` receives unresolved paths of ``source_variable`` and expressions.
    Raises :class:`StepError`.
    """
    base: Scope = scope if not isinstance(scope, Mapping) else MappingScope(scope, builtins or {})
    run = _Run(t, params if isinstance(params, Mapping) else {}, base, on_unresolved)
    impl = _TRANSFORMS.get(t.type)
    extra: dict[str, Any] = {"index": t.index, "type": t.type}
    if impl is None:
        raise failure("unknown_transform_type", f"unknown transform type '{t.type}'", **extra)
    try:
        return impl(run)
    except StepError as exc:
        raise StepError(exc.error.model_copy(update={"details": {**exc.error.details, **extra}})) from exc
