"""Triggers (api.md §10): registrations and manual fires.

Reads come from the ``triggers`` and ``trigger_fires`` projections (joined with ``procedures`` for ``dormant``).
Every change is a command to the triggers service, single writer of trigger aggregates (``lo.cmd.trigger.*``);
the gateway waits for its outcome event and then for the projection, as for every command (§1.5). A manual fire
is ``lo.cmd.trigger.fire``: the service creates the run through the runtime's ``lo.cmd.run.create`` and answers
``trigger_fired`` once ``run_created`` is appended, so the run is visible when the answer arrives.

``POST /api/triggers/sync`` reconciles the registrations with ``source: ckp`` with the ``trigger`` blocks of the
``active`` versions (their compiled IR in ``lo_procedures``), one registration command per change; registrations
with ``source: api`` are never touched.

The webhook intake ``POST /api/triggers/webhook/{procedure_id}`` is :mod:`langorch_gateway.routes_webhooks`; both
fires are answered by :mod:`langorch_gateway.fires`.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ckp_core.commands import Command, DeleteTrigger, DisableTrigger, EnableTrigger, FireTrigger, UpsertTrigger
from ckp_core.events import format_time
from ckp_core.ids import new_id
from ckp_core.ir import ProcedureIR
from ckp_core.schedules import Schedule
from ckp_core.subjects import PROCEDURES_BUCKET, procedure_key
from ckp_core.triggers import desired_registration, sync_action, trigger_id
from langorch_gateway import auth, deps
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import (
    Outcome,
    accepted_headers,
    min_position,
    pending,
    raise_if_rejected,
    ryw,
    send,
)
from langorch_gateway.fires import submit_fire
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import Limit, Offset, Where, fetch_page

router = APIRouter()

TRIGGERS_VIEW = """(SELECT t.*, p.status AS version_status FROM triggers t
    LEFT JOIN procedures p ON p.procedure_id = t.procedure_id AND p.version = t.version) AS triggers_view"""
FIRE_OUTCOMES = ("started", "duplicate", "throttled", "skipped", "invalid")
TriggerTypeFilter = Literal["scheduled", "webhook", "event", "file_watch"]
IfMatch = Annotated[str | None, Header(alias="If-Match")]


class TriggerIn(BaseModel):
    """A registration (api.md §10.2); the triggers service validates it per type."""

    model_config = ConfigDict(extra="forbid")

    trigger_type: str = Field(min_length=1, max_length=50)
    schedule: str | None = Field(None, max_length=200)
    timezone: str | None = Field(None, max_length=100)
    webhook_secret: str | None = Field(None, max_length=200)
    signature_scheme: str | None = Field(None, max_length=50)
    event_source: str | None = Field(None, max_length=2000)
    input_vars: dict[str, Any] | None = None
    dedupe_window_seconds: int = Field(0, ge=0, le=10 * 365 * 24 * 3600)
    max_concurrent_runs: int | None = Field(None, ge=1)
    enabled: bool = True


class FireIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_vars: dict[str, Any] = Field(default_factory=dict)


def _time(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def next_fire_at(row: asyncpg.Record) -> str | None:
    """The next slot of a schedule that fires by itself (enabled, its version active); null for the others."""
    if row["trigger_type"] != "scheduled" or not row["enabled"] or row["version_status"] != "active":
        return None
    return format_time(Schedule(row["schedule"], row["timezone"] or "UTC").next_after(datetime.now(UTC)))


def trigger_out(row: asyncpg.Record, public_url: str) -> dict[str, Any]:
    """``TriggerOut`` (api.md §10.1)."""
    webhook = row["trigger_type"] == "webhook"
    return {
        "procedure_id": row["procedure_id"], "version": row["version"], "trigger_type": row["trigger_type"],
        "schedule": row["schedule"], "timezone": row["timezone"], "webhook_secret": row["webhook_secret"],
        "signature_scheme": row["signature_scheme"] if webhook else None,
        "webhook_url": f"{public_url}/api/triggers/webhook/{row['procedure_id']}" if webhook else None,
        "event_source": row["event_source"], "input_vars": _json(row["input_vars"]) or {},
        "dedupe_window_seconds": row["dedupe_window_seconds"], "max_concurrent_runs": row["max_concurrent_runs"],
        "enabled": row["enabled"], "dormant": row["version_status"] != "active", "source": row["source"],
        "next_fire_at": next_fire_at(row), "last_fired_at": _time(row["last_fired_at"]),
        "last_run_id": row["last_run_id"],
        "revision": row["revision"], "created_at": _time(row["created_at"]), "created_by": row["created_by"],
        "updated_at": _time(row["updated_at"]),
    }


def _public_url(settings: Any) -> str:
    return str(settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


async def _row(db: asyncpg.Pool, procedure_id: str, version: str) -> asyncpg.Record | None:
    return await db.fetchrow(f"SELECT * FROM {TRIGGERS_VIEW} WHERE trigger_id = $1",  # noqa: S608
                             trigger_id(procedure_id, version))


async def _existing(db: asyncpg.Pool, procedure_id: str, version: str) -> asyncpg.Record:
    row = await _row(db, procedure_id, version)
    if row is None:
        raise ApiProblem("not_found", f"no trigger is registered for {procedure_id}@{version}", resource="trigger")
    return row


async def _version(db: asyncpg.Pool, procedure_id: str, version: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT procedure_id, version, status, project_id FROM procedures "
                            "WHERE procedure_id = $1 AND version = $2", procedure_id, version)
    if row is None:
        raise ApiProblem("not_found", f"procedure {procedure_id} version {version} not found", resource="procedure")
    return row


def _revision_of(if_match: str | None) -> int | None:
    """The revision an ``If-Match`` names (``"3"``, ``W/"3"``); None for absent or ``*``."""
    if if_match is None or if_match.strip() == "*":
        return None
    raw = if_match.strip().removeprefix("W/").strip('"')
    if not raw.isdigit():
        raise ApiProblem("precondition_failed", f"If-Match {if_match!r} does not name a revision")
    return int(raw)


async def _command(request: Request, command: Command, procedure_id: str, version: str,
                   command_type: str) -> Outcome | JSONResponse:
    """Send a registration command; its outcome (raised as a problem when rejected) or the 202 pending answer."""
    tid = trigger_id(procedure_id, version)
    outcome = await send(request, "trigger", tid, command, command_type,
                         resource=f"/api/triggers/{procedure_id}/{version}")
    if outcome is None:
        return pending(command.command_id, command_type)
    raise_if_rejected(outcome)
    return outcome


async def _answer(request: Request, db: asyncpg.Pool, settings: Any, command: Command, outcome: Outcome,
                  procedure_id: str, version: str, command_type: str, status: int = 200) -> JSONResponse:
    projected = await ryw(request, outcome.position)
    row = await _row(db, procedure_id, version)
    if row is None:
        return pending(command.command_id, command_type)
    return JSONResponse(trigger_out(row, _public_url(settings)), status_code=status, headers={
        "ETag": f'"{row["revision"]}"', **accepted_headers(command.command_id, outcome.position, projected)})


@router.get("/api/triggers")
async def list_triggers(
    principal: auth.Viewer,
    request: Request, db: deps.Pool, settings: deps.Settings,
    procedure_id: str | None = None,
    trigger_type: TriggerTypeFilter | None = None,
    enabled: bool | None = None,
    source: Literal["api", "ckp"] | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of registrations (by procedure and version)."""
    where = Where()
    for column, value in (("procedure_id", procedure_id), ("trigger_type", trigger_type), ("enabled", enabled),
                          ("source", source)):
        where.eq(column, value)
    headers = await min_position(request)
    rows, total = await fetch_page(db, TRIGGERS_VIEW, where, "procedure_id, version", limit, offset)
    public = _public_url(settings)
    return JSONResponse({"items": [trigger_out(r, public) for r in rows], "total": total, "limit": limit,
                         "offset": offset}, headers=headers)


@router.get("/api/triggers/{procedure_id}/{version}")
async def get_trigger(principal: auth.Viewer, request: Request, db: deps.Pool, settings: deps.Settings,
                      procedure_id: str, version: str) -> JSONResponse:
    """One registration; ``ETag`` is its revision (for ``If-Match`` on upsert)."""
    headers = await min_position(request)
    row = await _existing(db, procedure_id, version)
    return JSONResponse(trigger_out(row, _public_url(settings)),
                        headers={"ETag": f'"{row["revision"]}"', **headers})


@router.post("/api/triggers/{procedure_id}/{version}")
async def upsert_trigger(principal: auth.Operator, request: Request, db: deps.Pool, settings: deps.Settings,
                         procedure_id: str, version: str, body: TriggerIn,
                         if_match: IfMatch = None) -> Response:
    """Register (201) or replace (200) the version's trigger; ``If-Match`` guards the revision (412)."""
    await _version(db, procedure_id, version)
    command = UpsertTrigger(
        actor=principal.actor, causation_id=request.state.request_id, procedure_id=procedure_id, version=version,
        trigger_type=body.trigger_type, schedule=body.schedule, timezone=body.timezone,
        webhook_secret=body.webhook_secret, signature_scheme=body.signature_scheme, event_source=body.event_source,
        input_vars=body.input_vars or {}, dedupe_window_seconds=body.dedupe_window_seconds,
        max_concurrent_runs=body.max_concurrent_runs, enabled=body.enabled, source="api",
        expected_revision=_revision_of(if_match))
    outcome = await _command(request, command, procedure_id, version, "upsert_trigger")
    if isinstance(outcome, JSONResponse):
        return outcome
    created = outcome.envelope.type == "trigger_registered"
    return await _answer(request, db, settings, command, outcome, procedure_id, version, "upsert_trigger",
                         201 if created else 200)


@router.delete("/api/triggers/{procedure_id}/{version}")
async def delete_trigger(principal: auth.Operator, request: Request, db: deps.Pool, procedure_id: str,
                         version: str) -> Response:
    """Remove the registration (204)."""
    await _existing(db, procedure_id, version)
    command = DeleteTrigger(actor=principal.actor, causation_id=request.state.request_id,
                            procedure_id=procedure_id, version=version)
    outcome = await _command(request, command, procedure_id, version, "delete_trigger")
    if isinstance(outcome, JSONResponse):
        return outcome
    projected = await ryw(request, outcome.position)
    return Response(status_code=204, headers=accepted_headers(command.command_id, outcome.position, projected))


async def _switch(request: Request, db: asyncpg.Pool, settings: Any, principal: auth.Principal, procedure_id: str,
                  version: str, enable: bool) -> Response:
    await _existing(db, procedure_id, version)
    cls = EnableTrigger if enable else DisableTrigger
    command = cls(actor=principal.actor, causation_id=request.state.request_id, procedure_id=procedure_id,
                  version=version)
    command_type = "enable_trigger" if enable else "disable_trigger"
    outcome = await _command(request, command, procedure_id, version, command_type)
    if isinstance(outcome, JSONResponse):
        return outcome
    return await _answer(request, db, settings, command, outcome, procedure_id, version, command_type)


@router.post("/api/triggers/{procedure_id}/{version}/enable")
async def enable_trigger(principal: auth.Operator, request: Request, db: deps.Pool, settings: deps.Settings,
                         procedure_id: str, version: str) -> Response:
    return await _switch(request, db, settings, principal, procedure_id, version, True)


@router.post("/api/triggers/{procedure_id}/{version}/disable")
async def disable_trigger(principal: auth.Operator, request: Request, db: deps.Pool, settings: deps.Settings,
                          procedure_id: str, version: str) -> Response:
    return await _switch(request, db, settings, principal, procedure_id, version, False)


def manual_dedupe_key(input_vars: dict[str, Any]) -> str:
    """A manual fire's identity for the dedupe window: SHA-256 of its inputs as canonical JSON."""
    canonical = json.dumps(input_vars, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post("/api/triggers/{procedure_id}/{version}/fire")
async def fire_trigger(principal: auth.Operator, request: Request, db: deps.Pool, procedure_id: str, version: str,
                       body: FireIn | None = None) -> Response:
    """Fire the registration once (``trigger_type: manual``, ``triggered_by``: the principal); 202 ``FireOut``
    once the run is created."""
    await _existing(db, procedure_id, version)
    procedure = await _version(db, procedure_id, version)
    inputs = body.input_vars if body is not None else {}
    who = principal.actor.render()
    command = FireTrigger(actor=principal.actor, causation_id=request.state.request_id, procedure_id=procedure_id,
                          version=version, run_id=new_id(), trigger_type="manual", triggered_by=who,
                          input_vars=inputs, dedupe_key=manual_dedupe_key(inputs),
                          source_detail={"request_id": request.state.request_id},
                          project_id=procedure["project_id"])
    return (await submit_fire(request, command)).response


@router.get("/api/triggers/{procedure_id}/{version}/fires")
async def list_fires(principal: auth.Viewer, request: Request, db: deps.Pool, procedure_id: str, version: str,
                     outcome: Literal["started", "duplicate", "throttled", "skipped", "invalid"] | None = None,
                     limit: Limit = 100, offset: Offset = 0) -> JSONResponse:
    """The registration's fires, newest first."""
    headers = await min_position(request)
    await _existing(db, procedure_id, version)
    where = Where()
    where.eq("trigger_id", trigger_id(procedure_id, version))
    where.eq("outcome", outcome)
    rows, total = await fetch_page(db, "trigger_fires", where, "fired_at DESC, position DESC", limit, offset)
    items = [{"fire_id": r["fire_id"], "fired_at": _time(r["fired_at"]), "outcome": r["outcome"],
              "reason": r["reason"], "run_id": r["run_id"], "trigger_type": r["trigger_type"],
              "triggered_by": r["triggered_by"], "source_detail": _json(r["source_detail"]) or {}} for r in rows]
    return JSONResponse({"items": items, "total": total, "limit": limit, "offset": offset}, headers=headers)


def _diagnostics(outcome: Outcome | JSONResponse | None, fallback: str) -> list[dict[str, Any]]:
    if isinstance(outcome, Outcome) and outcome.envelope.type == "command_rejected":
        d = outcome.envelope.data
        errors = (d.get("extra") or {}).get("errors") or {}
        if errors:
            return [{"code": d.get("code"), "message": message, "path": f"/trigger/{field}"}
                    for field, messages in errors.items() for message in messages]
        return [{"code": d.get("code"), "message": d.get("detail")}]
    return [{"code": "pending", "message": fallback}]


@router.post("/api/triggers/sync")
async def sync_triggers(principal: auth.Operator, request: Request, db: deps.Pool) -> JSONResponse:
    """Register, update or remove the ``source: ckp`` registrations so they match the ``trigger`` blocks of the
    ``active`` versions. A registration of a version that is no longer active stays (``dormant``). The triggers
    service does the same for each version as it becomes active (``langorch_triggers.sync``); this reconciles
    every active version at once and reports the blocks that cannot be registered."""
    versions = await db.fetch("SELECT procedure_id, version FROM procedures WHERE status = 'active' "
                              "ORDER BY procedure_id, version")
    existing = {r["trigger_id"]: r for r in await db.fetch("SELECT * FROM triggers")}
    kv = await clients(request).js.key_value(PROCEDURES_BUCKET)
    counts = {"synced": 0, "registered": 0, "updated": 0, "removed": 0}
    errors: list[dict[str, Any]] = []
    for version_row in versions:
        procedure_id, version = version_row["procedure_id"], version_row["version"]
        try:
            entry = await kv.get(procedure_key(procedure_id, version))
            ir = ProcedureIR.model_validate_json(entry.value or b"{}")
        except Exception:  # a missing or unreadable IR is reported for that version only
            errors.append({"procedure_id": procedure_id, "version": version, "diagnostics": [
                {"code": "ir_not_readable", "message": "the compiled procedure could not be read"}]})
            continue
        desired = desired_registration(ir)
        row = existing.get(trigger_id(procedure_id, version))
        if row is not None and row["source"] == "api":
            continue  # never touched
        counts["synced"] += 1
        action = sync_action(None if row is None else {**dict(row), "input_vars": _json(row["input_vars"])},
                             desired)
        if action == "keep":
            continue
        if action == "remove":
            command: Command = DeleteTrigger(actor=principal.actor, causation_id=request.state.request_id,
                                             procedure_id=procedure_id, version=version)
            outcome = await send(request, "trigger", trigger_id(procedure_id, version), command, "delete_trigger",
                                 resource=f"/api/triggers/{procedure_id}/{version}")
            if outcome is not None and outcome.envelope.type == "trigger_deleted":
                counts["removed"] += 1
                await ryw(request, outcome.position)
            else:
                errors.append({"procedure_id": procedure_id, "version": version,
                               "diagnostics": _diagnostics(outcome, "the removal is still pending")})
            continue
        assert desired is not None  # "register" has a block to register
        command = UpsertTrigger(actor=principal.actor, causation_id=request.state.request_id,
                                procedure_id=procedure_id, version=version, source="ckp",
                                enabled=row["enabled"] if row is not None else True, **desired)
        outcome = await send(request, "trigger", trigger_id(procedure_id, version), command, "upsert_trigger",
                             resource=f"/api/triggers/{procedure_id}/{version}")
        if outcome is not None and outcome.envelope.type in ("trigger_registered", "trigger_updated"):
            counts["registered" if outcome.envelope.type == "trigger_registered" else "updated"] += 1
            await ryw(request, outcome.position)
        else:
            errors.append({"procedure_id": procedure_id, "version": version,
                           "diagnostics": _diagnostics(outcome, "the registration is still pending")})
    return JSONResponse({**counts, "errors": errors})
