"""The built-in functions of CKP expressions (ckp.md §5.5); their arities are in :mod:`.syntax`."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import TYPE_CHECKING, Any, TypeAlias

from ckp_core.expressions.syntax import _MAX_STR_LEN
from ckp_core.expressions.values import (
    _compact_json,
    _is_list,
    _is_num,
    _is_obj,
    _numeric_string,
    _step,
    format_embedded,
    json_type_name,
    truthy,
)

if TYPE_CHECKING:
    from ckp_core.expressions.evaluator import _Evaluator


# -- function implementations ------------------------------------------------------------------------------

_Impl: TypeAlias = Callable[["_Evaluator", list[Any], int], Any]


def _fn_len(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return 0
    if isinstance(x, (str, list, tuple)) or _is_obj(x):
        return len(x)
    raise ev.fail(f"len() needs a string, list or object, got {json_type_name(x)}", pos)


def _string_fn(name: str, fn: Callable[[str], str]) -> _Impl:
    def impl(ev: _Evaluator, args: list[Any], pos: int) -> Any:
        x = args[0]
        if x is None:
            return None
        if not isinstance(x, str):
            raise ev.fail(f"{name}() needs a string, got {json_type_name(x)}", pos)
        return fn(x)

    return impl


def _need_str(ev: _Evaluator, fname: str, value: Any, pos: int) -> str:
    if not isinstance(value, str):
        raise ev.fail(f"{fname}() needs a string, got {json_type_name(value)}", pos)
    return value


def _fn_replace(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    if args[0] is None:
        return None
    s, old, new = (_need_str(ev, "replace", a, pos) for a in args)
    count = len(s) + 1 if old == "" else s.count(old)
    if len(s) + count * (len(new) - len(old)) > _MAX_STR_LEN:
        raise ev.fail("string too large", pos)
    return s.replace(old, new)


def _fn_split(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    if args[0] is None:
        return None
    s = _need_str(ev, "split", args[0], pos)
    sep = _need_str(ev, "split", args[1], pos)
    return list(s) if sep == "" else s.split(sep)


def _fn_join(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    items = args[0]
    if items is None:
        return None
    sep = _need_str(ev, "join", args[1], pos) if len(args) > 1 else ","
    if not _is_list(items):
        raise ev.fail(f"join() needs a list, got {json_type_name(items)}", pos)
    ev.tick(pos, len(items))
    text = sep.join(format_embedded(item) for item in items)
    if len(text) > _MAX_STR_LEN:
        raise ev.fail("string too large", pos)
    return text


def _to_number(ev: _Evaluator, fname: str, x: Any, pos: int) -> int | float | None:
    if x is None:
        return None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    if isinstance(x, str):
        n = _numeric_string(x)
        if n is not None:
            return n
        raise ev.fail(f"{fname}() cannot convert {x[:40]!r} to a number", pos)
    raise ev.fail(f"{fname}() needs a number or numeric string, got {json_type_name(x)}", pos)


def _fn_int(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    n = _to_number(ev, "int", args[0], pos)
    if n is None:
        return None
    if isinstance(n, float):
        if not math.isfinite(n):
            raise ev.fail("numeric overflow", pos)
        return math.trunc(n)
    return n


def _fn_float(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    n = _to_number(ev, "float", args[0], pos)
    if n is None:
        return None
    try:
        return ev.number(float(n), pos)
    except OverflowError:
        raise ev.fail("numeric overflow", pos) from None


def _fn_str(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    return format_embedded(args[0])


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _fn_bool(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if isinstance(x, str):
        word = _BOOL_WORDS.get(x.strip().lower())
        if word is not None:
            return word
    return truthy(x)


def _fn_round(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    ndigits = args[1] if len(args) > 1 else 0
    if x is None:
        return None
    if not _is_num(x):
        raise ev.fail(f"round() needs a number, got {json_type_name(x)}", pos)
    if not isinstance(ndigits, int) or isinstance(ndigits, bool):
        raise ev.fail(f"round() needs an integer number of digits, got {json_type_name(ndigits)}", pos)
    if isinstance(x, int):
        if ndigits >= 0:
            return x
        if ndigits < -5000:
            return 0
        return ev.number(round(x, ndigits), pos)
    if ndigits > 400:
        return x
    if ndigits < -400:
        return 0
    with localcontext() as ctx:
        ctx.prec = 1000
        try:
            d = Decimal(repr(x)).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_EVEN)
        except InvalidOperation:
            return x if ndigits > 0 else int(x)
    return int(d) if ndigits <= 0 else float(d)


def _fn_abs(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return None
    if not _is_num(x):
        raise ev.fail(f"abs() needs a number, got {json_type_name(x)}", pos)
    return abs(x)


def _field_value(item: Any, field_name: str) -> Any:
    cur = item
    for part in field_name.split("."):
        ok, cur, _ = _step(cur, part)
        if not ok:
            return None
    return cur


def _aggregate_values(ev: _Evaluator, fname: str, args: list[Any], pos: int) -> list[Any]:
    items = args[0]
    if items is None:
        return []
    if not _is_list(items):
        raise ev.fail(f"{fname}() needs a list, got {json_type_name(items)}", pos)
    field_name = args[1] if len(args) > 1 else None
    if field_name is not None and not isinstance(field_name, str):
        raise ev.fail(f"{fname}() needs a field name, got {json_type_name(field_name)}", pos)
    ev.tick(pos, len(items))
    if field_name is None:
        return [item for item in items if item is not None]
    values = (_field_value(item, field_name) for item in items)
    return [v for v in values if v is not None]


def _numbers(ev: _Evaluator, fname: str, values: list[Any], pos: int) -> list[int | float]:
    for v in values:
        if not _is_num(v):
            raise ev.fail(f"{fname}() needs numbers, got {json_type_name(v)}", pos)
    return values


def _fn_count(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    return len(_aggregate_values(ev, "count", args, pos))


def _fn_sum(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    values = _numbers(ev, "sum", _aggregate_values(ev, "sum", args, pos), pos)
    total: int | float = 0
    try:
        for v in values:
            total = ev.number(total + v, pos)
    except OverflowError:
        raise ev.fail("numeric overflow", pos) from None
    return total


def _fn_avg(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    values = _numbers(ev, "avg", _aggregate_values(ev, "avg", args, pos), pos)
    if not values:
        return None
    try:
        total: int | float = 0
        for v in values:
            total = ev.number(total + v, pos)
        return ev.number(total / len(values), pos)
    except OverflowError:
        raise ev.fail("numeric overflow", pos) from None


def _extreme(fname: str, want_less: bool) -> _Impl:
    def impl(ev: _Evaluator, args: list[Any], pos: int) -> Any:
        values = _aggregate_values(ev, fname, args, pos)
        best: Any = None
        for v in values:
            if not (_is_num(v) or isinstance(v, str)):
                raise ev.fail(f"{fname}() needs numbers or strings, got {json_type_name(v)}", pos)
            if best is None:
                best = v
                continue
            x, y = ev.ordered(v, best, fname, pos)
            if (x < y) if want_less else (x > y):
                best = v
        return best

    return impl


def _fn_keys(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return None
    if not _is_obj(x):
        raise ev.fail(f"keys() needs an object, got {json_type_name(x)}", pos)
    return list(x.keys())


def _fn_values(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    x = args[0]
    if x is None:
        return None
    if not _is_obj(x):
        raise ev.fail(f"values() needs an object, got {json_type_name(x)}", pos)
    return list(x.values())


def _fn_json(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    try:
        return _compact_json(args[0])
    except (TypeError, ValueError) as exc:
        raise ev.fail(f"json() cannot serialise the value: {exc}", pos) from None


def _fn_now(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    found, value = ev.scope.lookup("now")
    if found and value is not None:
        return value
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fn_today(ev: _Evaluator, args: list[Any], pos: int) -> Any:
    found, value = ev.scope.lookup("today")
    if found and value is not None:
        return value
    return datetime.now(UTC).date().isoformat()


_IMPLS: dict[str, _Impl] = {
    "len": _fn_len,
    "lower": _string_fn("lower", str.lower),
    "upper": _string_fn("upper", str.upper),
    "trim": _string_fn("trim", str.strip),
    "replace": _fn_replace,
    "split": _fn_split,
    "join": _fn_join,
    "int": _fn_int,
    "float": _fn_float,
    "str": _fn_str,
    "bool": _fn_bool,
    "round": _fn_round,
    "abs": _fn_abs,
    "count": _fn_count,
    "sum": _fn_sum,
    "avg": _fn_avg,
    "min": _extreme("min", True),
    "max": _extreme("max", False),
    "keys": _fn_keys,
    "values": _fn_values,
    "json": _fn_json,
    "now": _fn_now,
    "today": _fn_today,
}


