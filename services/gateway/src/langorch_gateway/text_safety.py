"""Refuse request input no event could carry: the NUL character (U+0000; PostgreSQL text and jsonb cannot store
it, so an event carrying one would be appended but could never be projected), lone surrogates, non-JSON numbers and
nesting past the event serialiser's depth. Reported at the exact field path."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from langorch_gateway.problems import ApiProblem

MESSAGE = "Must not contain the NUL character (U+0000)"
SURROGATE_MESSAGE = "Must be valid Unicode (a lone surrogate escape such as \\ud800 is not a character)"
SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")
# JSON nesting a body may have: events carry it, and their serialiser stops at 255 levels. CKP documents have their
# own limit of 128 inside ``ckp_json`` (compiler diagnostic ``invalid_document``), which this leaves room for.
MAX_DEPTH = 160
COMPILED_PATHS = "/api/procedures"  # ckp_json is vetted by the compiler (diagnostics, 200 from validate)


def nul_paths(value: Any, path: str = "") -> list[str]:
    """Dotted paths (``a.b.2``) of every string or key in ``value`` that contains U+0000."""
    return _paths(value, lambda text: "\x00" in text, path)


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def surrogate_paths(value: Any) -> list[str]:
    """Paths of every string or key holding a lone surrogate (``"\\ud800"`` parses, but is no character: it cannot
    be encoded as UTF-8, so no event could carry it)."""
    return _paths(value, _has_surrogate)


def _paths(value: Any, bad: Callable[[str], bool], path: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(value, str):
        if bad(value):
            found.append(path or "body")
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if bad(str(key)):
                found.append(_printable(where))
            found.extend(_paths(item, bad, where))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(_paths(item, bad, f"{path}.{i}" if path else str(i)))
    return found


def _printable(path: str) -> str:
    """A path whose key is itself bad, with the offending characters written as JSON escapes."""
    return "".join(f"\\u{ord(ch):04x}" if ch == "\x00" or "\ud800" <= ch <= "\udfff" else ch for ch in path)


async def check_request(request: Request) -> None:
    """Raise 422 when the path, a query parameter or the JSON body contains U+0000."""
    errors: dict[str, list[str]] = {}
    if "\x00" in request.url.path:
        errors["path"] = [MESSAGE]
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            errors[f"query.{name.replace(chr(0), '')}"] = [MESSAGE]
    if request.method in ("POST", "PUT", "PATCH"):
        raw = await request.body()
        if b"NaN" in raw or b"Infinity" in raw:
            _refuse_non_json_numbers(raw)
        if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:  # only then can it nest too deep
            _refuse_deep_nesting(raw)
        if b"\\u0000" in raw.lower():  # cheap pre-filter; JSON can only carry U+0000 escaped
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                body = None  # malformed JSON is answered 400 by the route's validation
            for where in nul_paths(body):
                errors[where] = [MESSAGE]
        if not request.url.path.startswith(COMPILED_PATHS) and SURROGATE_ESCAPE.search(raw):
            # a surrogate can only arrive escaped (raw ones are not UTF-8)
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                body = None
            for where in surrogate_paths(body):
                errors.setdefault(where, []).append(SURROGATE_MESSAGE)
    if errors:
        raise ApiProblem("validation_failed", f"{len(errors)} field(s) contain the NUL character or a lone "
                         "surrogate", errors=errors)


class _NonJsonNumber(ValueError):
    pass


def _constant(name: str) -> Any:
    raise _NonJsonNumber(name)


def _refuse_non_json_numbers(raw: bytes) -> None:
    """Python's JSON parser takes ``NaN``/``Infinity`` (not JSON, RFC 8259 §6); they would be stored as null."""
    try:
        json.loads(raw, parse_constant=_constant)
    except _NonJsonNumber as exc:
        raise ApiProblem("malformed_json", f"request body is not valid JSON: {exc} is not a JSON number") from None
    except (ValueError, RecursionError):
        return  # otherwise malformed: answered 400 by the route's validation


def too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Dotted path of the first object or array nested deeper than ``limit`` levels (iterative), else None."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            children: list[tuple[str, Any]] = [(str(k), v) for k, v in item.items()]
        elif isinstance(item, list):
            children = [(str(i), v) for i, v in enumerate(item)]
        else:
            continue
        if depth > limit:
            return path or "body"
        for key, child in children:
            stack.append((child, f"{path}.{key}" if path else key, depth + 1))
    return None


def _refuse_deep_nesting(raw: bytes) -> None:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return  # malformed (or nested past the parser's own limit): answered 400 by the route
    where = too_deep(body)
    if where is not None:
        raise ApiProblem("validation_failed", f"the body nests deeper than {MAX_DEPTH} levels",
                         errors={where: [f"Must not nest deeper than {MAX_DEPTH} levels"]})
