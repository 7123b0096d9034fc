"""Values as CKP expressions see them (ckp.md §5.4): JSON types, truthiness, numbers in strings, equality,
how a value is embedded in text; and the scopes names are resolved in."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Protocol

# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------

_NUMERIC_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _is_obj(v: Any) -> bool:
    return isinstance(v, Mapping)


def _numeric_string(s: str) -> int | float | None:
    """The number a numeric string (§5.4) denotes, else None."""
    t = s.strip()
    if not _NUMERIC_RE.fullmatch(t):
        return None
    if "." in t or "e" in t or "E" in t:
        return float(t)
    try:
        return int(t)
    except ValueError:
        return float(t)


def json_type_name(v: Any) -> str:
    """The JSON type name of a value (`null`, `boolean`, `integer`, `number`, `string`, `array`, `object`)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if _is_list(v):
        return "array"
    if _is_obj(v):
        return "object"
    return type(v).__name__


def truthy(value: Any) -> bool:
    """Truthiness (§5.4): null, false, 0, 0.0, "", [], {} are false; everything else is true."""
    if value is None or value is False:
        return False
    if _is_num(value):
        return bool(value)
    if isinstance(value, (str, list, tuple)) or _is_obj(value):
        return len(value) > 0
    return True


def _json_default(o: Any) -> Any:
    if isinstance(o, Mapping):
        return dict(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not a JSON value")


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def format_embedded(value: Any) -> str:
    """Format a value for embedding in a string (§5.1): strings as is, ints as digits, floats in shortest
    round-trip form with a fraction or exponent, true/false, null as "", arrays/objects as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return _compact_json(value)


def _deep_eq(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    a_num, b_num = _is_num(a), _is_num(b)
    if a_num and b_num:
        return bool(a == b)
    if a_num and isinstance(b, str):
        n = _numeric_string(b)
        return n is not None and a == n
    if b_num and isinstance(a, str):
        n = _numeric_string(a)
        return n is not None and b == n
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if _is_list(a) and _is_list(b):
        return len(a) == len(b) and all(_deep_eq(x, y) for x, y in zip(a, b, strict=True))
    if _is_obj(a) and _is_obj(b):
        if len(a) != len(b):
            return False
        return all(k in b and _deep_eq(v, b[k]) for k, v in a.items())
    return False


# ---------------------------------------------------------------------------------------------------------
# Scopes
# ---------------------------------------------------------------------------------------------------------


class Scope(Protocol):
    """Resolves root names: ``lookup(name) -> (found, value)``."""

    def lookup(self, name: str) -> tuple[bool, Any]: ...


class MappingScope:
    """A scope over layered mappings; the first layer holding the name wins."""

    def __init__(self, *layers: Mapping[str, Any]) -> None:
        self.layers: tuple[Mapping[str, Any], ...] = layers

    def lookup(self, name: str) -> tuple[bool, Any]:
        """Return ``(True, value)`` from the first layer that has ``name``, else ``(False, None)``."""
        for layer in self.layers:
            if name in layer:
                return True, layer[name]
        return False, None




_MISSING_KEY = "missing_key"
_OUT_OF_RANGE = "index_out_of_range"
_NOT_CONTAINER = "not_a_container"


def _step(cur: Any, key: Any) -> tuple[bool, Any, str]:
    """One path step (§5.2): ``(resolved, value, reason)``."""
    if _is_obj(cur):
        if isinstance(key, str):
            k: Any = key
        elif isinstance(key, int) and not isinstance(key, bool):
            k = str(key)
        else:
            return False, None, _MISSING_KEY
        if k in cur:
            return True, cur[k], ""
        return False, None, _MISSING_KEY
    if _is_list(cur):
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            n = len(cur)
            i = key + n if key < 0 else key
            if 0 <= i < n:
                return True, cur[i], ""
            return False, None, _OUT_OF_RANGE
        if key == "length":
            return True, len(cur), ""
        return False, None, _MISSING_KEY
    if isinstance(cur, str) and key == "length":
        return True, len(cur), ""
    return False, None, _NOT_CONTAINER


