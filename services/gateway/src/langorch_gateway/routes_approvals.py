"""Approvals (api.md §6): list, detail, decision and the live ``approval_update`` stream.

Reads come from the ``approvals`` projection joined with ``runs`` (for ``run_status``). A decision is the
command ``lo.cmd.approval.decide``; the approvals service — single writer of approval aggregates — answers it
with ``approval_decided`` or ``command_rejected``, and the gateway waits for the projection before answering.
The stream reads ``lo.evt.approval.>`` straight from JetStream and folds each approval with ``ckp_core``'s
``evolve``, so what it sends never lags the projection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from ckp_core.approvals import STATUSES, ApprovalState, approval_view, evolve, fold, normalise_decision
from ckp_core.commands import DecideApproval
from ckp_core.events import format_time
from ckp_core.redaction import Redactor
from langorch_gateway import auth, deps
from langorch_gateway.dispatch import accepted_headers, min_position, pending, raise_if_rejected, ryw, send
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import (
    MAX_BIGINT,
    Limit,
    Offset,
    Order,
    Where,
    comma_list,
    fetch_page,
    gather,
    header_position,
)
from langorch_gateway.routes_runs_more import parse_query_time
from langorch_gateway.streams import until_stopping
from langorch_infra.jetstream import follow

router = APIRouter()

APPROVALS_VIEW = """(SELECT a.*, r.status AS run_status FROM approvals a
    LEFT JOIN runs r ON r.run_id = a.run_id) AS approvals_view"""
STATUS_ALIASES = {"timeout": "timed_out", "cancelled": "canceled"}
_REDACT = Redactor()


class DecisionIn(BaseModel):
    """``{decision, comment?, payload?}``; ``status`` and ``resolved_decision`` are accepted aliases of
    ``decision`` (api.md §1.8), ``decided_by`` must name the principal."""

    model_config = ConfigDict(extra="forbid")

    decision: str | None = Field(None, min_length=1, max_length=200)
    status: str | None = Field(None, min_length=1, max_length=200)
    resolved_decision: str | None = Field(None, min_length=1, max_length=200)
    comment: str | None = Field(None, max_length=10_000)
    payload: Any = None
    decided_by: str | None = Field(None, max_length=300)

    def resolved(self) -> str:
        given = {name: value for name, value in (("decision", self.decision), ("status", self.status),
                                                 ("resolved_decision", self.resolved_decision)) if value is not None}
        if not given:
            raise ApiProblem("validation_failed", "decision is required", errors={"decision": [
                "This field is required"]})
        values = {normalise_decision(v) for v in given.values()}
        if len(values) > 1:
            raise ApiProblem("validation_failed", "decision, status and resolved_decision disagree",
                             errors={name: ["Disagrees with the other decision members"] for name in given})
        return values.pop()


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _time(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None


def approval_out(state: ApprovalState, run_status: str | None) -> dict[str, Any]:
    """``ApprovalOut`` (api.md §6.1), redacted (§1.7)."""
    out = approval_view(state, run_status)
    out["context_data"] = _REDACT.redact(out["context_data"] or {})  # an object: none declared is {} (§1.1)
    out["decision_payload"] = _REDACT.redact(out["decision_payload"])
    return out


def state_of(row: asyncpg.Record) -> ApprovalState:
    """The projection row as the aggregate state (so rows and streamed folds render identically)."""
    return ApprovalState(
        approval_id=row["approval_id"], seq=row["seq"], position=row["position"], exists=True,
        run_id=row["run_id"], procedure_id=row["procedure_id"], procedure_version=row["procedure_version"],
        node_id=row["node_id"], node_name=row["node_name"], project_id=row["project_id"], prompt=row["prompt"],
        context_data=_json(row["context_data"]), decision_type=row["decision_type"],
        options=_json(row["options"]) or [], input_schema=_json(row["input_schema"]) or {}, status=row["status"],
        decision=row["decision"], decided_by=row["decided_by"], decided_at=_time(row["decided_at"]),
        comment=row["comment"], decision_payload=_json(row["decision_payload"]),
        created_at=_time(row["created_at"]), expires_at=_time(row["expires_at"]),
        timeout_action=row["timeout_action"], escalation_contact=row["escalation_contact"],
        approval_level=row["approval_level"], updated_at=_time(row["updated_at"]))


def row_out(row: asyncpg.Record) -> dict[str, Any]:
    return approval_out(state_of(row), row["run_status"])


async def _row(db: asyncpg.Pool, approval_id: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT * FROM {APPROVALS_VIEW} WHERE approval_id = $1",  # noqa: S608
                                       approval_id)


def _query_time(name: str, raw: str | None) -> datetime | None:
    """A query datetime, parsed as on every other list (RFC 3339 with an offset, api.md §1.1)."""
    return parse_query_time(name, raw)


@router.get("/api/approvals")
async def list_approvals(
    principal: auth.Viewer,
    request: Request, db: deps.Pool,
    status: str | None = None,
    run_id: str | None = None,
    procedure_id: str | None = None,
    node_id: str | None = None,
    project_id: str | None = None,
    decided_by: str | None = None,
    created_from: str | None = None,
    created_to: str | None = None,
    expires_before: str | None = None,
    sort: Literal["created_at", "expires_at"] = "created_at",
    order: Order = "desc",
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of approvals (newest first by default)."""
    statuses, since, until, expires = gather(
        lambda: comma_list("status", status, STATUSES, STATUS_ALIASES),
        lambda: _query_time("created_from", created_from), lambda: _query_time("created_to", created_to),
        lambda: _query_time("expires_before", expires_before))
    where = Where()
    where.eq("status", statuses)
    for column, value in (("run_id", run_id), ("procedure_id", procedure_id), ("node_id", node_id),
                          ("project_id", project_id), ("decided_by", decided_by)):
        where.eq(column, value)
    bounds = (("created_at >=", since), ("created_at <", until), ("expires_at <", expires))
    for clause, bound in bounds:
        if bound is not None:
            where.add(f"{clause} {where.arg(bound)}")
    headers = await min_position(request)
    nulls = " NULLS LAST" if sort == "expires_at" else ""
    rows, total = await fetch_page(db, APPROVALS_VIEW, where,
                                   f"{sort} {order}{nulls}, approval_id {order}", limit, offset)
    return JSONResponse({"items": [row_out(r) for r in rows], "total": total, "limit": limit, "offset": offset},
                        headers=headers)


@router.get("/api/approvals/stream")
async def approvals_stream(
    principal: auth.Viewer,
    db: deps.Pool,
    js: deps.JetStream,
    settings: deps.Settings,
    store: deps.EventStore,
    metrics: deps.Metrics,
    slots: deps.Slots,
    request: Request,
    status: str | None = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_BIGINT)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """Live ``approval_update`` events from the tail, or exactly after ``Last-Event-ID`` / ``?after=``."""
    statuses = comma_list("status", status, STATUSES, STATUS_ALIASES)
    start = after
    if last_event_id is not None:
        start = header_position("Last-Event-ID", last_event_id)
    release = slots.acquire(principal.actor.render())
    drain = deps.clients(request).drain

    async def updates() -> AsyncGenerator[ServerSentEvent, None]:
        yield ServerSentEvent(comment="langorch approval stream", retry=3000)
        open_states: dict[str, ApprovalState] = {}
        async for stored in follow(js, "lo.evt.approval.>", start or 0, new_only=start is None):
            ev = stored.envelope
            if ev.type == "command_rejected":
                continue  # a refused decision leaves the approval as it was
            state = open_states.get(ev.aggregate_id)
            if state is None:
                history = [] if ev.type == "approval_requested" else await store.read("approval", ev.aggregate_id)
                state = fold(ev.aggregate_id, ((e.envelope, e.position) for e in history
                                               if e.position < stored.position))
            evolve(state, ev, stored.position)
            if state.pending:
                open_states[state.approval_id] = state
            else:
                open_states.pop(state.approval_id, None)
            if statuses is not None and state.status not in statuses:
                continue
            run_status = await db.fetchval("SELECT status FROM runs WHERE run_id = $1", state.run_id)
            data = {"event_type": ev.type, **approval_out(state, run_status)}
            yield ServerSentEvent(json.dumps(data, separators=(",", ":")), event="approval_update",
                                  id=str(stored.position))

    async def counted() -> AsyncIterator[ServerSentEvent]:
        metrics.sse.labels(stream="approvals").inc()
        try:
            async for event in until_stopping(updates(), drain):
                yield event
        finally:
            metrics.sse.labels(stream="approvals").dec()
            release()

    return EventSourceResponse(counted(), ping=settings.sse_keepalive_s, headers={"Cache-Control": "no-cache"},
                               background=BackgroundTask(release))


@router.get("/api/approvals/{approval_id}")
async def get_approval(principal: auth.Viewer, request: Request, db: deps.Pool, approval_id: str) -> JSONResponse:
    """One approval with its run's current status."""
    headers = await min_position(request)
    row = await _row(db, approval_id)
    if row is None:
        raise ApiProblem("not_found", f"approval {approval_id} not found", resource="approval")
    return JSONResponse(row_out(row), headers=headers)


@router.post("/api/approvals/{approval_id}/decision")
async def decide(principal: auth.Approver, request: Request, db: deps.Pool, store: deps.EventStore, approval_id: str,
                 body: DecisionIn) -> JSONResponse:
    """Decide a pending approval; the run resumes asynchronously (``run_status`` may still read
    ``waiting_approval`` in the answer)."""
    who = principal.actor
    decision = body.resolved()
    if body.decided_by is not None and body.decided_by != who.render():
        raise ApiProblem("decided_by_mismatch", f"decided_by {body.decided_by!r} is not the authenticated "
                         f"principal {who.render()!r}",
                         errors={"decided_by": ["Must equal the authenticated principal"]})
    if await _row(db, approval_id) is None and await store.head("approval", approval_id) is None:
        raise ApiProblem("not_found", f"approval {approval_id} not found", resource="approval")
    command = DecideApproval(actor=who, causation_id=request.state.request_id, approval_id=approval_id,
                             decision=decision, comment=body.comment, payload=body.payload)
    outcome = await send(request, "approval", approval_id, command, "decide_approval",
                         resource=f"/api/approvals/{approval_id}")
    if outcome is None:
        return pending(command.command_id, "decide_approval")
    raise_if_rejected(outcome)
    await ryw(request, outcome.position)
    row = await _row(db, approval_id)
    if row is None:
        return pending(command.command_id, "decide_approval")
    return JSONResponse(row_out(row), headers=accepted_headers(command.command_id, outcome.position))
