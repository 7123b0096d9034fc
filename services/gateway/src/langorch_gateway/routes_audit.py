"""The audit log (api.md §12): ``GET /api/audit``, a page of ``AuditEntry`` from the ``audit_log`` projection
(fed by ``LO_AUDIT``, not ``LO_EVT``, so ``X-LangOrch-Min-Position`` does not apply), newest first."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from langorch_gateway import auth, deps, views
from langorch_gateway.queries import Limit, Offset, Where, comma_list, fetch_page
from langorch_gateway.routes_runs_more import parse_query_time

router = APIRouter()

Text = Annotated[str | None, Query(min_length=1, max_length=500)]


def audit_out(row: asyncpg.Record) -> dict[str, Any]:
    """One ``AuditEntry`` (api.md §12)."""
    return {
        "event_id": row["event_id"], "ts": views._time(row["ts"]), "category": row["category"],
        "action": row["action"], "outcome": row["outcome"], "actor": row["actor"], "actor_kind": row["actor_kind"],
        "description": row["description"], "resource_type": row["resource_type"],
        "resource_id": row["resource_id"], "request_id": row["request_id"], "command_id": row["command_id"],
        "correlation_id": row["correlation_id"], "auth_disabled": row["auth_disabled"],
        "meta": views._json(row["meta"]) or {},
    }


@router.get("/api/audit")
async def list_audit(
    principal: auth.Viewer,
    db: deps.Pool,
    category: Text = None,
    action: Text = None,
    actor: Text = None,
    actor_kind: Annotated[Literal["user", "api_key", "agent", "trigger", "system", "anonymous"] | None,
                          Query()] = None,
    outcome: Annotated[Literal["accepted", "rejected"] | None, Query()] = None,
    resource_type: Text = None,
    resource_id: Text = None,
    request_id: Text = None,
    search: Text = None,
    since: str | None = None,
    until: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of audit records, newest first (``since`` inclusive, ``until`` exclusive)."""
    where = Where()
    where.eq("category", comma_list("category", category))
    where.eq("action", comma_list("action", action))
    for column, value in (("actor", actor), ("actor_kind", actor_kind), ("outcome", outcome),
                          ("resource_type", resource_type), ("resource_id", resource_id),
                          ("request_id", request_id)):
        where.eq(column, value)
    if search:
        where.add(f"strpos(lower(description), {where.arg(search.lower())}) > 0")
    for clause, bound in (("ts >=", parse_query_time("since", since)), ("ts <", parse_query_time("until", until))):
        if bound is not None:
            where.add(f"{clause} {where.arg(bound)}")
    rows, total = await fetch_page(db, "audit_log", where, "ts DESC, event_id DESC", limit, offset)
    return JSONResponse({"items": [audit_out(r) for r in rows], "total": total, "limit": limit, "offset": offset})
