"""More of the runs API (api.md §5.3, §5.5, §5.6, §5.8, §5.9): rerun, delete, cleanup, children, artifacts and
diagnostics; plus the projection of ``run_deleted`` and ``artifact_created`` (table ``run_artifacts``)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from nats.js.errors import NotFoundError, ObjectNotFoundError
from pydantic import BaseModel, ConfigDict, Field

from ckp_core import runs
from ckp_core.commands import CreateRun, DeleteRun
from ckp_core.errors import CommandRefused, InvalidInputVars
from ckp_core.events import format_time
from ckp_core.ids import new_id
from ckp_core.queries import (
    MAX_VALUE_BYTES,
    RunCheckpoint,
    RunCheckpointReply,
    RunCheckpoints,
    RunCheckpointsReply,
    RunDiagnostics,
    RunDiagnosticsReply,
)
from ckp_core.subjects import ARTIFACTS_BUCKET
from ckp_core.variables import VariableSpec, validate_inputs
from langorch_gateway import auditing, auth, deps, run_creation, views
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import (
    accepted_headers,
    min_position,
    pending,
    raise_if_rejected,
    require_nats,
    ryw,
    send,
)
from langorch_gateway.problems import ApiProblem, problem_response, refused_problem
from langorch_gateway.queries import Limit, Offset, Where, comma_list, fetch_page, gather
from langorch_gateway.runtime_queries import ask
from langorch_infra.jetstream import publish_command

router = APIRouter()

ERROR_EVENTS = ("node_error", "step_failed", "run_failed")
MAX_CLEANUP = 10_000


# -- helpers ---------------------------------------------------------------------------------------------------


def _db(request: Request) -> asyncpg.Pool:
    return clients(request).pool


async def _run(request: Request, run_id: str) -> asyncpg.Record:
    row = await _db(request).fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
    if row is None:
        raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
    return row


def parse_query_time(name: str, raw: str | None) -> datetime | None:
    """An RFC 3339 query datetime with an offset (api.md §1.1); anything else → 422 at ``query.<name>``."""
    if raw is None:
        return None
    text = raw.strip()
    unescaped = re.fullmatch(r"(.*\d) (\d\d:\d\d)", text)  # a '+' of the offset sent unencoded reads as a space
    if unescaped:
        text = f"{unescaped.group(1)}+{unescaped.group(2)}"
    ok = re.fullmatch(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", text)
    parsed = None
    if ok:
        try:  # in UTC: a time whose UTC instant leaves years 1…9999 is out of range too, not a 500 from the database
            parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00")).astimezone(UTC)
        except (ValueError, OverflowError):
            parsed = None
    if parsed is None:
        raise ApiProblem("validation_failed", f"{name} is not an RFC 3339 datetime with offset",
                         errors={f"query.{name}": ["Must be an RFC 3339 datetime with an offset"]})
    return parsed


# -- rerun -----------------------------------------------------------------------------------------------------


class RerunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_vars: dict[str, Any] | None = None
    procedure_version: str | None = None


@router.post("/api/runs/{run_id}/rerun", status_code=201)
async def rerun(principal: auth.Operator,
                request: Request, db: deps.Pool, run_id: str, body: RerunIn | None = None) -> JSONResponse:
    """A new run of the same procedure (``rerun_of``), the original's version and inputs unless given; created
    by the runtime like every run (``lo.cmd.run.create``)."""
    body = body or RerunIn()
    original = await _run(request, run_id)
    version = body.procedure_version or original["procedure_version"]
    pid = original["procedure_id"]
    if version == "latest":
        row = await db.fetchrow("SELECT * FROM procedures WHERE procedure_id = $1 AND status IN ('draft', 'active') "
                                "ORDER BY position DESC LIMIT 1", pid)
    else:
        row = await db.fetchrow("SELECT * FROM procedures WHERE procedure_id = $1 AND version = $2", pid, version)
    if row is None:
        raise ApiProblem("not_found", f"procedure {pid} version {version} not found", resource="procedure")
    async with auditing.refusals_audited(request, "run", "start", resource_type="run", resource_id=None,
                                         meta={"rerun_of": run_id, "procedure_id": pid, "procedure_version": version}):
        if row["status"] not in ("draft", "active"):
            raise ApiProblem("procedure_not_runnable", f"version {row['version']} is {row['status']}")
        eff = row["effective_date"]
        if eff and date.fromisoformat(eff) > datetime.now(UTC).date():
            raise ApiProblem("procedure_not_effective", f"version {row['version']} is effective from {eff}")
    schema = views._json(row["variables_schema"]) or {}
    variables = {n: VariableSpec.model_validate(s | {"has_default": s.get("default") is not None})
                 for n, s in schema.items()}
    raw_inputs = body.input_vars if body.input_vars is not None else (views._json(original["input_vars"]) or {})
    new_run = new_id()
    builtins = {"run_id": new_run, "root_run_id": new_run, "parent_run_id": None,
                "procedure_id": pid, "procedure_version": row["version"], "trigger_type": "api",
                "triggered_by": f"rerun:{run_id}", "now": format_time(datetime.now(UTC)),
                "today": datetime.now(UTC).date().isoformat()}
    try:  # a pre-check for precise 422s: the runtime validates the inputs again when it decides
        validate_inputs(variables, raw_inputs, builtins)
    except InvalidInputVars as exc:
        raise await auditing.refused_decision(request, "run", "start", "run", None, ApiProblem(
            "invalid_input_vars", exc.message, errors=exc.errors)) from exc
    command = CreateRun(actor=principal.actor, causation_id=request.state.request_id, run_id=new_run, procedure_id=pid,
                        procedure_version=row["version"], input_vars=raw_inputs, trigger_type="api",
                        triggered_by=f"rerun:{run_id}", root_run_id=new_run, rerun_of=run_id,
                        project_id=original["project_id"] or row["project_id"])
    return await run_creation.submit(request, command)


# -- delete and cleanup ----------------------------------------------------------------------------------------


async def _descendants(db: asyncpg.Pool, run_id: str) -> int:
    return int(await db.fetchval(
        """WITH RECURSIVE tree AS (SELECT run_id FROM runs WHERE parent_run_id = $1
             UNION SELECT r.run_id FROM runs r JOIN tree t ON r.parent_run_id = t.run_id)
           SELECT count(*) FROM tree""", run_id))


@router.delete("/api/runs/{run_id}")
async def delete_run(principal: auth.Operator, request: Request, db: deps.Pool, run_id: str) -> JSONResponse:
    """Delete a terminal run and its children (``lo.cmd.run.delete``); waits for the row to disappear."""
    row = await _run(request, run_id)
    status = row["status"]
    command = DeleteRun(actor=principal.actor, causation_id=request.state.request_id, run_id=run_id)
    try:
        runs.decide_delete(status)
    except CommandRefused as refusal:
        raise await auditing.refused(request, command, refused_problem(refusal)) from None
    children = await _descendants(db, run_id)
    outcome = await send(request, "run", run_id, command, "delete_run")
    if outcome is None:
        return pending(command.command_id, "delete_run")
    raise_if_rejected(outcome)
    await ryw(request, outcome.position)
    return JSONResponse({"deleted": True, "run_id": run_id, "children_deleted": children},
                        headers=accepted_headers(command.command_id, outcome.position))


class CleanupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: str
    statuses: list[str] | None = None
    procedure_id: str | None = None
    project_id: str | None = None
    dry_run: bool = True
    limit: int = Field(1000, ge=1, le=MAX_CLEANUP)


def _body_time(name: str, raw: str) -> datetime:
    try:
        parsed = parse_query_time(name, raw)
    except ApiProblem:
        parsed = None
    if parsed is None:
        raise ApiProblem("validation_failed", f"{name} is not an RFC 3339 datetime with offset",
                         errors={name: ["Must be an RFC 3339 datetime with an offset"]})
    return parsed


def _terminal_statuses(field: str, values: list[str] | None) -> list[str]:
    if not values:
        return list(runs.TERMINAL_STATUSES)
    out = [v.strip().replace("cancelled", "canceled") for v in values]
    bad = [v for v in out if v not in runs.TERMINAL_STATUSES]
    if bad:
        raise ApiProblem("validation_failed", f"not terminal statuses: {', '.join(bad)}",
                         errors={field: [f"Must be terminal statuses: {', '.join(runs.TERMINAL_STATUSES)}"]})
    return out


async def _cleanup(request: Request, before: datetime, statuses: list[str], procedure_id: str | None,
                   project_id: str | None, limit: int, dry_run: bool) -> dict[str, Any]:
    where = Where()
    where.add(f"created_at < {where.arg(before)}")
    where.eq("status", statuses)
    where.eq("procedure_id", procedure_id)
    where.eq("project_id", project_id)
    rows, matched = await fetch_page(_db(request), "runs", where, "created_at, run_id", limit if not dry_run else 50,
                                     0, columns="run_id")
    base: dict[str, Any] = {"dry_run": dry_run, "matched": matched}
    if dry_run:
        return base | {"sample_run_ids": [r["run_id"] for r in rows], "before": format_time(before.astimezone(UTC)),
                       "statuses": statuses}
    cleanup_id = new_id()
    require_nats(request)
    for r in rows:
        await publish_command(clients(request).js, DeleteRun(
            actor=auth.actor(request),
            causation_id=request.state.request_id, run_id=r["run_id"], cleanup_id=cleanup_id))
    out = base | {"accepted": len(rows), "cleanup_id": cleanup_id}
    await auditing.decided(request, "run", "cleanup", resource_type="run", resource_id=None, event_id=cleanup_id,
                           meta=out | {"before": format_time(before.astimezone(UTC)), "statuses": statuses,
                                       "procedure_id": procedure_id, "project_id": project_id, "limit": limit})
    return out


@router.post("/api/runs/cleanup")
async def cleanup(principal: auth.Admin, request: Request, body: CleanupIn) -> JSONResponse:
    """Preview (``dry_run``, 200) or delete (202) terminal runs created before ``before`` (api.md §5.6)."""
    before, statuses = gather(lambda: _body_time("before", body.before),
                              lambda: _terminal_statuses("statuses", body.statuses))
    out = await _cleanup(request, before, statuses, body.procedure_id, body.project_id, body.limit, body.dry_run)
    return JSONResponse(out, status_code=200 if body.dry_run else 202)


@router.delete("/api/runs/cleanup/history", deprecated=True)
async def cleanup_history(
    principal: auth.Admin,
    request: Request,
    before: Annotated[str, Query()],
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_CLEANUP)] = 1000,
) -> dict[str, Any]:
    """Alias of ``POST /api/runs/cleanup`` with ``dry_run: false`` (api.md §1.8)."""
    when = parse_query_time("before", before)
    assert when is not None
    statuses = _terminal_statuses("query.status", status.split(",") if status else None)
    out = await _cleanup(request, when, statuses, None, None, limit, False)
    return {"deleted_count": out["accepted"], "before": before, "status": status}


# -- children --------------------------------------------------------------------------------------------------


@router.get("/api/runs/{run_id}/children")
async def children(principal: auth.Viewer,
                   request: Request, db: deps.Pool, run_id: str, status: str | None = None, limit: Limit = 100,
                   offset: Offset = 0) -> JSONResponse:
    """Page of a run's child runs, oldest first."""
    headers = await min_position(request)
    await _run(request, run_id)
    where = Where()
    where.eq("parent_run_id", run_id)
    where.eq("status", comma_list("status", status, runs.STATUSES, {"cancelled": "canceled"}))
    rows, total = await fetch_page(db, "runs", where, "created_at, run_id", limit, offset)
    return JSONResponse(views.page([views.run_out(r) for r in rows], total, limit, offset), headers=headers)


# -- artifacts -------------------------------------------------------------------------------------------------


async def stored_sha256(request: Request, rows: list[asyncpg.Record]) -> dict[str, str]:
    """SHA-256 (hex) of the stored content of ``rows``, from the object store's digest; content that has expired
    or was never stored has none."""
    out: dict[str, str] = {}
    wanted = [r["artifact_id"] for r in rows if r["stored"]]
    if not wanted:
        return out
    try:
        store = await clients(request).js.object_store(ARTIFACTS_BUCKET)
    except NotFoundError:
        return out
    for artifact_id in wanted:
        try:
            info = await store.get_info(artifact_id)
        except (NotFoundError, ObjectNotFoundError):
            continue
        digest = info.digest or ""
        if digest.upper().startswith("SHA-256="):
            out[artifact_id] = base64.urlsafe_b64decode(digest[8:] + "=" * (-len(digest[8:]) % 4)).hex()
    return out


def artifact_out(row: asyncpg.Record, sha256: str | None = None) -> dict[str, Any]:
    stored = bool(row["stored"])
    content = f"/api/runs/{row['run_id']}/artifacts/{row['artifact_id']}/content"
    return {
        "artifact_id": row["artifact_id"], "run_id": row["run_id"], "node_id": row["node_id"],
        "step_id": row["step_id"], "kind": row["kind"], "name": row["name"], "uri": row["uri"],
        "mime_type": row["mime_type"], "size_bytes": row["size_bytes"], "sha256": sha256, "stored": stored,
        "download_url": content if stored else row["uri"], "created_at": views._time(row["created_at"]),
    }


@router.get("/api/runs/{run_id}/artifacts")
async def artifacts(principal: auth.Viewer,
                    request: Request, db: deps.Pool, run_id: str, kind: str | None = None, node_id: str | None = None,
                    limit: Limit = 100, offset: Offset = 0) -> JSONResponse:
    """Page of a run's artifacts in ``created_at`` order."""
    headers = await min_position(request)
    await _run(request, run_id)
    where = Where()
    where.eq("run_id", run_id)
    where.eq("kind", comma_list("kind", kind))
    where.eq("node_id", node_id)
    rows, total = await fetch_page(db, "run_artifacts", where, "created_at, artifact_id", limit, offset)
    digests = await stored_sha256(request, rows)
    return JSONResponse(views.page([artifact_out(r, digests.get(r["artifact_id"])) for r in rows], total, limit,
                                   offset), headers=headers)


async def _artifact(request: Request, run_id: str, artifact_id: str) -> asyncpg.Record:
    await _run(request, run_id)
    row = await _db(request).fetchrow("SELECT * FROM run_artifacts WHERE run_id = $1 AND artifact_id = $2", run_id,
                                      artifact_id)
    if row is None:
        raise ApiProblem("not_found", f"artifact {artifact_id} of run {run_id} not found", resource="artifact")
    return row


@router.get("/api/runs/{run_id}/artifacts/{artifact_id}")
async def artifact(principal: auth.Viewer, request: Request, run_id: str, artifact_id: str) -> JSONResponse:
    headers = await min_position(request)
    row = await _artifact(request, run_id, artifact_id)
    digests = await stored_sha256(request, [row])
    return JSONResponse(artifact_out(row, digests.get(artifact_id)), headers=headers)


RANGE_SYNTAX = re.compile(r"\s*bytes=(\d+-\d*|-\d+)\s*")


def _range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive of a single ``bytes=`` range; None when it cannot be satisfied."""
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):
        n = int(m.group(2))
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


@router.get("/api/runs/{run_id}/artifacts/{artifact_id}/content")
async def artifact_content(principal: auth.Viewer, request: Request, run_id: str, artifact_id: str) -> Response:
    """The stored bytes (Range supported); a link artifact → 409 ``artifact_external`` with its ``uri``."""
    return await _content(request, await _artifact(request, run_id, artifact_id))


@router.get("/api/artifacts/{run_id}/{name}", deprecated=True)
async def artifact_by_name(principal: auth.Viewer, request: Request, db: deps.Pool, run_id: str, name: str) -> Response:
    """Alias of ``…/artifacts/{artifact_id}/content`` resolved by artifact ``name`` (api.md §1.8); the newest
    artifact of that name when several share it."""
    await _run(request, run_id)
    row = await db.fetchrow(
        "SELECT * FROM run_artifacts WHERE run_id = $1 AND name = $2 ORDER BY created_at DESC, artifact_id DESC "
        "LIMIT 1", run_id, name)
    if row is None:
        raise ApiProblem("not_found", f"no artifact named {name!r} in run {run_id}", resource="artifact")
    return await _content(request, row)


async def _content(request: Request, row: asyncpg.Record) -> Response:
    artifact_id = row["artifact_id"]
    if not row["stored"]:
        raise ApiProblem("artifact_external", f"artifact {artifact_id} is a link, not stored content",
                         status=409, uri=row["uri"])
    try:
        store = await clients(request).js.object_store(ARTIFACTS_BUCKET)
        result = await store.get(artifact_id)
        data: bytes = result.data or b""
    except (NotFoundError, ObjectNotFoundError):
        raise ApiProblem("not_found", f"content of artifact {artifact_id} is no longer stored",
                         resource="artifact_content") from None
    name = (row["name"] or artifact_id).replace('"', "")
    headers = {"Content-Disposition": f'attachment; filename="{name}"', "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "sandbox", "Accept-Ranges": "bytes"}
    media = row["mime_type"] or "application/octet-stream"
    raw_range = request.headers.get("range")
    # a Range this server does not take (another unit, several ranges, bad syntax) is ignored: the whole content
    # (RFC 9110 §14.2); 416 is only for a single byte range outside the content (api.md §1.2)
    if raw_range and RANGE_SYNTAX.fullmatch(raw_range):
        span = _range(raw_range, len(data))
        if span is None:
            refused = problem_response(request, "range_not_satisfiable",
                                       f"range {raw_range!r} is outside {len(data)} bytes", status=416)
            refused.headers["Content-Range"] = f"bytes */{len(data)}"
            return refused
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return Response(data[start:end + 1], status_code=206, media_type=media, headers=headers)
    return Response(data, media_type=media, headers=headers)


# -- diagnostics -----------------------------------------------------------------------------------------------


@router.get("/api/runs/{run_id}/diagnostics")
async def diagnostics(principal: auth.Viewer, request: Request, db: deps.Pool, run_id: str) -> JSONResponse:
    """What an operator needs to see why a run is stuck or failed (api.md §5.8 ``RunDiagnostics``)."""
    headers = await min_position(request)
    row = await _run(request, run_id)
    counts = await db.fetch("SELECT event_type, count(*) AS n FROM run_events WHERE run_id = $1 GROUP BY event_type",
                            run_id)
    by_type = {r["event_type"]: int(r["n"]) for r in counts}
    last_progress = await db.fetchval("SELECT max(created_at) FROM run_events WHERE run_id = $1", run_id)
    live = await ask(request, RunDiagnostics(run_id=run_id), RunDiagnosticsReply)  # step records, leases and
    # checkpoints are the runtime's: it answers the live part
    started = await db.fetchrow(
        "SELECT payload FROM run_events WHERE run_id = $1 AND event_type IN ('execution_started', "
        "'execution_resumed', 'execution_recovered') ORDER BY seq DESC LIMIT 1", run_id)
    started_payload = views._json(started["payload"]) if started else {}
    run = views.run_out(row)
    body = {k: run[k] for k in ("run_id", "thread_id", "status", "last_node_id", "last_step_id", "retry_count",
                                "waiting_on")}
    body |= {
        "has_retry_event": by_type.get("run_retry_requested", 0) > 0,
        "idempotency_entries": [entry.model_dump() for entry in live.idempotency_entries],
        "active_leases": [lease.lease_out() for lease in live.active_leases],
        "total_events": sum(by_type.values()),
        "error_events": sum(by_type.get(t, 0) for t in ERROR_EVENTS),
        "events_by_type": by_type,
        "execution": {
            "runtime_instance": (started_payload or {}).get("runtime_instance"),
            "delivery_count": 1 + by_type.get("execution_recovered", 0) if started else 0,
            "last_progress_at": views._time(last_progress),
            "checkpoint_count": live.checkpoint_count,
            "last_checkpoint_id": live.last_checkpoint_id,
        },
    }
    return JSONResponse(body, headers=headers)


# -- checkpoints -----------------------------------------------------------------------------------------------


@router.get("/api/runs/{run_id}/checkpoints")
async def checkpoints(principal: auth.Viewer,
                      request: Request, run_id: str, checkpoint_ns: str = "", limit: Limit = 100,
                      offset: Offset = 0) -> dict[str, Any]:
    """Page of the run's LangGraph checkpoints, newest first (asked of the runtime, which owns them)."""
    await _run(request, run_id)
    reply = await ask(request, RunCheckpoints(run_id=run_id, checkpoint_ns=checkpoint_ns, offset=offset, limit=limit),
                      RunCheckpointsReply)
    return views.page([item.model_dump() for item in reply.items], reply.total, limit, offset)


@router.get("/api/runs/{run_id}/checkpoints/{checkpoint_id}")
async def checkpoint_detail(
    principal: auth.Operator,
    request: Request,
    run_id: str,
    checkpoint_id: str,
    checkpoint_ns: str = "",
    max_value_bytes: Annotated[int, Query(ge=1, le=MAX_VALUE_BYTES)] = 65_536,
) -> dict[str, Any]:
    """One checkpoint's state, redacted (api.md §1.7), values above ``max_value_bytes`` truncated (by the
    runtime, which owns the checkpoints); each read is audited."""
    await _run(request, run_id)
    reply = await ask(request, RunCheckpoint(run_id=run_id, checkpoint_id=checkpoint_id,
                                             checkpoint_ns=checkpoint_ns, max_value_bytes=max_value_bytes),
                      RunCheckpointReply)
    if reply.checkpoint is None:
        raise ApiProblem("not_found", f"checkpoint {checkpoint_id} of run {run_id} not found", resource="checkpoint")
    await auditing.decided(request, "run", "checkpoint_viewed", resource_type="run", resource_id=run_id,
                           meta={"checkpoint_id": checkpoint_id, "checkpoint_ns": checkpoint_ns},
                           correlation_id=run_id)
    return reply.checkpoint.model_dump()
