"""Query helpers shared by the routers: paging parameters, comma lists, one-snapshot pages (api.md §1.4)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Depends, Query, Request

from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem

PAGE_SIZE_CEILING = 10_000  # the highest LANGORCH_MAX_PAGE_SIZE may be set to (the limit the OpenAPI shows)
MAX_BIGINT = 2**63 - 1  # offsets and stream positions reach PostgreSQL as bigint: larger ones are a 422, not a 500


def page_limit(request: Request, limit: Annotated[int, Query(ge=1, le=PAGE_SIZE_CEILING)] = 100) -> int:
    """``limit`` of a list: 1…``LANGORCH_MAX_PAGE_SIZE`` (api.md §1.4), out of range → 422, never clamped; when
    not given, 100 or the setting if that is lower."""
    highest = clients(request).settings.max_page_size
    if "limit" not in request.query_params:
        return min(limit, highest)
    if limit > highest:
        raise ApiProblem("validation_failed", f"limit must be at most {highest}",
                         errors={"query.limit": [f"Input should be less than or equal to {highest}"]})
    return limit


Limit = Annotated[int, Depends(page_limit)]
Offset = Annotated[int, Query(ge=0, le=MAX_BIGINT)]
Order = Annotated[Literal["asc", "desc"], Query()]
_POSITION = re.compile(r"[0-9]{1,19}")


def header_position(name: str, raw: str) -> int:
    """A stream sequence sent in a header (``Last-Event-ID``, ``X-LangOrch-Min-Position``): ASCII digits within
    PostgreSQL's bigint, else 422 at ``header.<name>`` (``str.isdigit`` also accepts ``²``, which ``int`` refuses)."""
    if not _POSITION.fullmatch(raw) or int(raw) > MAX_BIGINT:
        raise ApiProblem("validation_failed", f"{name} must be a stream sequence",
                         errors={f"header.{name}": ["Must be a non-negative integer"]})
    return int(raw)


def comma_list(name: str, raw: str | None, allowed: tuple[str, ...] | None = None,
               aliases: dict[str, str] | None = None) -> list[str] | None:
    """Split a multi-value filter (``status=failed,canceled``); unknown values → 422 at ``query.<name>``; a filter
    that names no value (``status=``) is no filter (None), not one that matches nothing."""
    if raw is None:
        return None
    values = [(aliases or {}).get(v.strip(), v.strip()) for v in raw.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ApiProblem("validation_failed", f"unknown {name} value(s): {', '.join(bad)}",
                             errors={f"query.{name}": [f"Must be one of: {', '.join(allowed)}"]})
    return values or None


def gather(*checks: Callable[[], Any]) -> list[Any]:
    """Run every check and return their results; when any fail with a 422, raise one 422 with the errors of all
    of them (api.md §1.2: validation errors report every failing field, not only the first)."""
    results: list[Any] = []
    errors: dict[str, list[str]] = {}
    for check in checks:
        try:
            results.append(check())
        except ApiProblem as problem:
            if problem.status != 422 or not problem.errors:
                raise
            for field, messages in problem.errors.items():
                errors.setdefault(field, []).extend(messages)
            results.append(None)
    if errors:
        n = len(errors)
        raise ApiProblem("validation_failed", f"{n} field{'s' if n != 1 else ''} failed validation", errors=errors)
    return results


class Where:
    """Accumulates ``AND``-ed SQL conditions with numbered parameters."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[Any] = []

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def eq(self, column: str, value: Any) -> None:
        if value is None or value == "":  # an empty filter (?procedure_id=) filters nothing out, like no filter
            return
        if isinstance(value, list):
            self.clauses.append(f"{column} = ANY({self.arg(value)})")
        else:
            self.clauses.append(f"{column} = {self.arg(value)}")

    def add(self, clause: str) -> None:
        self.clauses.append(clause)

    def sql(self) -> str:
        return (" WHERE " + " AND ".join(self.clauses)) if self.clauses else ""


async def fetch_page(db: asyncpg.Pool, source: str, where: Where, order: str, limit: int,
                     offset: int, columns: str = "*") -> tuple[list[asyncpg.Record], int]:
    """Rows and exact total of one filtered list, read in one repeatable-read snapshot."""
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        total = await conn.fetchval(f"SELECT count(*) FROM {source}{where.sql()}", *where.args)  # noqa: S608
        rows = await conn.fetch(
            f"SELECT {columns} FROM {source}{where.sql()} ORDER BY {order} "  # noqa: S608
            f"LIMIT {int(limit)} OFFSET {int(offset)}", *where.args)
    return list(rows), int(total)
