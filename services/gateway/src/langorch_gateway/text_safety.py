"""Refuse the NUL character (U+0000) in request input: PostgreSQL text and jsonb cannot store it, so an event
carrying one would be appended but could never be projected. Reported as 422 at the exact field path."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from langorch_gateway.problems import ApiProblem

MESSAGE = "Must not contain the NUL character (U+0000)"
MAX_DEPTH = 128  # JSON nesting a body may have: events carry it, and their serialiser stops at 255 levels


def nul_paths(value: Any, path: str = "") -> list[str]:
    """Dotted paths (``a.b.2``) of every string or key in ``value`` that contains U+0000."""
    found: list[str] = []
    if isinstance(value, str):
        if "\x00" in value:
            found.append(path or "body")
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                found.append(where.replace("\x00", "\\u0000"))
            found.extend(nul_paths(item, where))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.extend(nul_paths(item, f"{path}.{i}" if path else str(i)))
    return found


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
    if errors:
        raise ApiProblem("validation_failed", f"{len(errors)} field(s) contain the NUL character", errors=errors)


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
