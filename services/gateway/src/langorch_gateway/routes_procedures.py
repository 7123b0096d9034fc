"""Procedure catalogue and lifecycle (api.md §4.1–4.5, §4.7): import, list, summary, versions, deployments,
detail, replace, delete, status, promote, rollback.

Route order matters: paths whose second segment is a literal (``versions``, ``deployments``, and the
``validate``/``diff`` routes that live elsewhere) are declared before ``/{procedure_id}/{version}``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ckp_core import runs
from ckp_core.commands import (
    DeleteProcedureVersion,
    ImportProcedure,
    PromoteProcedure,
    ReplaceProcedure,
    RollbackProcedure,
    SetProcedureStatus,
)
from ckp_core.compiler import compile_document
from ckp_core.procedure_lifecycle import CHANNELS, STATUSES
from langorch_gateway import auditing, auth, deps, views
from langorch_gateway.dispatch import accepted_headers, min_position, pending, raise_if_rejected, ryw, send
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import Limit, Offset, Order, Where, comma_list, fetch_page, gather
from langorch_gateway.routes_analysis import StoredLookup, stored_lookup

router = APIRouter()

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
Channel = Literal["dev", "qa", "prod"]
IfMatch = Annotated[str | None, Header(alias="If-Match")]


class ImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ckp_json: dict[str, Any]
    project_id: str | None = None


class ReplaceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ckp_json: dict[str, Any]


class StatusIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["draft", "active", "deprecated", "archived"]
    reason: str | None = Field(None, max_length=2000)


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_channel: Channel
    reason: str | None = Field(None, max_length=2000)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_channel: Channel
    rollback_to_version: str | None = None
    reason: str | None = Field(None, max_length=2000)


async def _version_row(db: asyncpg.Pool, procedure_id: str, version: str) -> asyncpg.Record:
    if version == "latest":
        row = await db.fetchrow(
            "SELECT * FROM procedures WHERE procedure_id = $1 ORDER BY position DESC LIMIT 1", procedure_id)
    else:
        row = await db.fetchrow(
            "SELECT * FROM procedures WHERE procedure_id = $1 AND version = $2", procedure_id, version)
    if row is None:
        raise ApiProblem("not_found", f"procedure {procedure_id} version {version} not found", resource="procedure")
    return row


async def _procedure_exists(db: asyncpg.Pool, procedure_id: str) -> None:
    known = await db.fetchval(
        """SELECT EXISTS (SELECT 1 FROM procedures WHERE procedure_id = $1)
             OR EXISTS (SELECT 1 FROM procedure_deployments WHERE procedure_id = $1)""", procedure_id)
    if not known:
        raise ApiProblem("not_found", f"procedure {procedure_id} not found", resource="procedure")


def _revision_of(if_match: str | None) -> int | None:
    """The revision an ``If-Match`` names (``"3"``, ``W/"3"``); None for absent or ``*``."""
    if if_match is None or if_match.strip() == "*":
        return None
    raw = if_match.strip().removeprefix("W/").strip('"')
    if not raw.isascii() or not raw.isdigit():
        raise ApiProblem("precondition_failed", f"If-Match {if_match!r} does not name a revision")
    return int(raw)


def _check_if_match(row: asyncpg.Record, expected: int | None) -> None:
    if expected is not None and expected != row["revision"]:
        raise ApiProblem("precondition_failed", f"version {row['version']} is at revision {row['revision']}",
                         current_revision=row["revision"])


def _compile_for_store(ckp_json: dict[str, Any], lookup: StoredLookup | None = None) -> Any:
    """Compile like an import: identity errors → 422 validation_failed, other errors → 422 compile_failed.
    ``lookup`` lets subflow references be checked against the stored procedures (recursion, missing targets)."""
    result = compile_document(ckp_json, lookup)
    diagnostics = [d.model_dump(mode="json") for d in result.diagnostics]
    identity_errors = {f"ckp_json.{d.path.lstrip('/')}": [d.message] for d in result.errors
                       if d.path in ("/procedure_id", "/version")}
    if identity_errors:
        raise ApiProblem("validation_failed", "procedure_id or version is missing or malformed",
                         errors=identity_errors, diagnostics=diagnostics)
    if not result.ok:
        n = len(result.errors)
        raise ApiProblem("compile_failed", f"{n} compile error{'s' if n != 1 else ''}", errors={},
                         diagnostics=diagnostics)
    return result.ir


def _detail_response(row: asyncpg.Record, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(views.procedure_detail(row), status_code=status,
                        headers={"ETag": f'"{row["revision"]}"', **(headers or {})})


# -- collection ------------------------------------------------------------------------------------------


@router.post("/api/procedures", status_code=201)
async def import_procedure(principal: auth.Operator, request: Request, db: deps.Pool, body: ImportIn) -> JSONResponse:
    """Compile, then import a procedure version through the compiler service (a document that does not compile
    is refused here, and audited as a rejected import)."""
    named = body.ckp_json.get("procedure_id")
    async with auditing.refusals_audited(request, "procedure", "import", resource_type="procedure",
                                         resource_id=named if isinstance(named, str) else None,
                                         meta={"ckp_json": body.ckp_json, "project_id": body.project_id},
                                         statuses=(422,)):
        ir = _compile_for_store(body.ckp_json, await stored_lookup(db, body.ckp_json))
    pid, version = ir.procedure_id, ir.version
    if body.project_id is not None and await db.fetchval(
            "SELECT 1 FROM projects WHERE project_id = $1", body.project_id) is None:
        raise ApiProblem("not_found", f"project {body.project_id} not found", resource="project")
    existing = await db.fetchrow(
        "SELECT content_hash FROM procedures WHERE procedure_id = $1 AND version = $2", pid, version)
    command = ImportProcedure(actor=principal.actor, causation_id=request.state.request_id,
                              ckp_json=body.ckp_json, project_id=body.project_id)
    if existing is not None:
        raise await auditing.refused(request, command, ApiProblem(
            "procedure_version_exists", f"procedure {pid} version {version} already exists",
            existing_content_hash=existing["content_hash"], identical=existing["content_hash"] == ir.content_hash))
    outcome = await send(request, "procedure", pid, command, "import_procedure",
                         f"/api/procedures/{pid}/{version}")
    if outcome is None:
        return pending(command.command_id, "import_procedure")
    raise_if_rejected(outcome)
    await ryw(request, outcome.position)
    row = await db.fetchrow("SELECT * FROM procedures WHERE procedure_id = $1 AND version = $2", pid, version)
    if row is None:
        return pending(command.command_id, "import_procedure")
    return _detail_response(row, 201, {"Location": f"/api/procedures/{pid}/{version}",
                                       **accepted_headers(command.command_id, outcome.position)})


SORTS = {"created_at": "created_at {o}, position {o}", "procedure_id": "procedure_id {o}",
         "name": "COALESCE(name, '') {o}"}


@router.get("/api/procedures")
async def list_procedures(
    principal: auth.Viewer,
    request: Request, db: deps.Pool,
    project_id: str | None = None,
    status: str | None = None,
    release_channel: str | None = None,
    procedure_id: str | None = None,
    tags: str | None = None,
    search: Annotated[str | None, Query(max_length=500)] = None,
    metadata_search: Annotated[str | None, Query(max_length=500)] = None,
    latest_only: bool = False,
    sort: Literal["created_at", "procedure_id", "name"] = "created_at",
    order: Order = "desc",
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of procedure versions with filters, sort and exact total (api.md §4.2)."""
    headers = await min_position(request)
    statuses, channels = gather(lambda: comma_list("status", status, STATUSES),
                                lambda: comma_list("release_channel", release_channel, CHANNELS))
    where = Where()
    where.eq("project_id", project_id)
    where.eq("status", statuses)
    where.eq("release_channel", channels)
    where.eq("procedure_id", procedure_id)
    wanted_tags = comma_list("tags", tags)
    if wanted_tags:
        where.add(f"tags @> {where.arg(json.dumps(wanted_tags))}::jsonb")
    if search:
        where.add(f"strpos(search_text, {where.arg(search.lower())}) > 0")
    if metadata_search:
        # strpos has no wildcards, so % and _ in the term match themselves
        where.add(f"strpos(lower(COALESCE(retrieval_metadata::text, '')), {where.arg(metadata_search.lower())}) > 0")
    if latest_only:
        inner = where.sql()
        where.add(f"(procedure_id, position) IN (SELECT procedure_id, max(position) "  # noqa: S608
                  f"FROM procedures{inner} GROUP BY procedure_id)")
    order_sql = SORTS[sort].format(o=order) + f", procedure_id {order}, version {order}"
    rows, total = await fetch_page(db, "procedures", where, order_sql, limit, offset)
    return JSONResponse(views.page([views.procedure_out(r) for r in rows], total, limit, offset), headers=headers)


# -- one procedure (literal second segments first) ------------------------------------------------------


@router.get("/api/procedures/{procedure_id}")
async def procedure_summary(principal: auth.Viewer, request: Request, db: deps.Pool, procedure_id: str) -> JSONResponse:
    """``ProcedureSummary``: versions count, newest version and the active version of each channel."""
    headers = await min_position(request)
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        latest = await conn.fetchrow(
            "SELECT * FROM procedures WHERE procedure_id = $1 ORDER BY position DESC LIMIT 1", procedure_id)
        count = await conn.fetchval("SELECT count(*) FROM procedures WHERE procedure_id = $1", procedure_id)
        active = await conn.fetch(
            "SELECT release_channel, version FROM procedures WHERE procedure_id = $1 AND status = 'active'",
            procedure_id)
    if latest is None:
        raise ApiProblem("not_found", f"procedure {procedure_id} not found", resource="procedure")
    channels: dict[str, str | None] = dict.fromkeys(CHANNELS)
    for r in active:
        channels[r["release_channel"]] = r["version"]
    return JSONResponse({"procedure_id": procedure_id, "name": latest["name"], "project_id": latest["project_id"],
                         "versions_count": int(count), "latest_version": latest["version"], "channels": channels},
                        headers=headers)


@router.get("/api/procedures/{procedure_id}/versions")
async def procedure_versions(
    principal: auth.Viewer,
    request: Request, db: deps.Pool,
    procedure_id: str,
    status: str | None = None,
    release_channel: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of one procedure's versions, newest first."""
    headers = await min_position(request)
    await _procedure_exists(db, procedure_id)
    where = Where()
    where.eq("procedure_id", procedure_id)
    where.eq("status", comma_list("status", status, STATUSES))
    where.eq("release_channel", comma_list("release_channel", release_channel, CHANNELS))
    rows, total = await fetch_page(db, "procedures", where, "position DESC, version DESC", limit, offset)
    return JSONResponse(views.page([views.procedure_out(r) for r in rows], total, limit, offset), headers=headers)


@router.get("/api/procedures/{procedure_id}/deployments")
async def procedure_deployments(
    principal: auth.Viewer,
    request: Request, db: deps.Pool,
    procedure_id: str,
    release_channel: str | None = None,
    action: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of promotion and rollback records, newest first."""
    headers = await min_position(request)
    await _procedure_exists(db, procedure_id)
    where = Where()
    where.eq("procedure_id", procedure_id)
    where.eq("target_channel", comma_list("release_channel", release_channel, CHANNELS))
    where.eq("action", comma_list("action", action, ("promote", "rollback")))
    rows, total = await fetch_page(db, "procedure_deployments", where,
                                   "position DESC, deployment_id DESC", limit, offset)
    return JSONResponse(views.page([views.deployment_out(r) for r in rows], total, limit, offset), headers=headers)


# -- one version -----------------------------------------------------------------------------------------


@router.get("/api/procedures/{procedure_id}/{version}")
async def get_procedure(principal: auth.Viewer,
                        request: Request, db: deps.Pool, procedure_id: str, version: str) -> JSONResponse:
    """One procedure version with its document; ``latest`` is the most recently imported."""
    headers = await min_position(request)
    return _detail_response(await _version_row(db, procedure_id, version), headers=headers)


@router.put("/api/procedures/{procedure_id}/{version}")
async def replace_procedure(principal: auth.Operator,
                            request: Request, db: deps.Pool, procedure_id: str, version: str, body: ReplaceIn,
                            if_match: IfMatch = None) -> JSONResponse:
    """Replace a draft's document (compiled like an import); ``If-Match`` guards the revision."""
    row = await _version_row(db, procedure_id, version)
    expected = _revision_of(if_match)
    _check_if_match(row, expected)
    ir = _compile_for_store(body.ckp_json, await stored_lookup(db, body.ckp_json))
    mismatch = {f"ckp_json.{k}": ["Must match the path"] for k, a, b in
                (("procedure_id", ir.procedure_id, procedure_id), ("version", ir.version, version)) if a != b}
    if mismatch:
        raise ApiProblem("validation_failed", "procedure_id and version inside the document must match the path",
                         errors=mismatch)
    command = ReplaceProcedure(actor=principal.actor, causation_id=request.state.request_id, procedure_id=procedure_id,
                               version=version, ckp_json=body.ckp_json, expected_revision=expected)
    return await _finish(request, db, command, "replace_procedure", procedure_id, version, detail=True)


@router.delete("/api/procedures/{procedure_id}/{version}")
async def delete_procedure(principal: auth.Operator, request: Request, db: deps.Pool, procedure_id: str, version: str,
                           if_match: IfMatch = None) -> JSONResponse:
    """Delete a version that is not active and that no non-terminal run uses."""
    row = await _version_row(db, procedure_id, version)
    expected = _revision_of(if_match)
    _check_if_match(row, expected)
    if row["status"] == "active":
        raise ApiProblem("procedure_version_active", f"version {version} is active in {row['release_channel']}; "
                         "deprecate or archive it first", current_status="active")
    in_use = await db.fetch(
        """SELECT run_id FROM runs WHERE procedure_id = $1 AND procedure_version = $2
             AND status <> ALL($3::text[]) ORDER BY created_at LIMIT 100""",
        procedure_id, version, list(runs.TERMINAL_STATUSES))
    if in_use:
        raise ApiProblem("procedure_version_in_use", f"{len(in_use)} unfinished run(s) use version {version}",
                         run_ids=[r["run_id"] for r in in_use])
    command = DeleteProcedureVersion(actor=principal.actor, causation_id=request.state.request_id,
                                     procedure_id=procedure_id, version=version, expected_revision=expected)
    outcome = await send(request, "procedure", procedure_id, command, "delete_procedure_version",
                         f"/api/procedures/{procedure_id}/{version}")
    if outcome is None:
        return pending(command.command_id, "delete_procedure_version")
    raise_if_rejected(outcome)
    await ryw(request, outcome.position)
    return JSONResponse({"deleted": True, "procedure_id": procedure_id, "version": version},
                        headers=accepted_headers(command.command_id, outcome.position))


@router.patch("/api/procedures/{procedure_id}/{version}/status")
async def set_status(principal: auth.Operator,
                     request: Request, db: deps.Pool, procedure_id: str, version: str, body: StatusIn) -> JSONResponse:
    """Move a version through the lifecycle; a no-op answers 200 and appends nothing."""
    row = await _version_row(db, procedure_id, version)
    if row["status"] == body.status:
        return JSONResponse(views.procedure_out(row), headers={"ETag": f'"{row["revision"]}"'})
    command = SetProcedureStatus(actor=principal.actor,
                                 causation_id=request.state.request_id, procedure_id=procedure_id,
                                 version=version, status=body.status, reason=body.reason)
    return await _finish(request, db, command, "set_procedure_status", procedure_id, version, detail=False)


def _prod_needs_admin(principal: auth.Principal, channel: str) -> None:
    """Promote and roll back are the operator's in ``dev`` and ``qa``, the admin's in ``prod`` (api.md §2.2)."""
    if channel == "prod" and not principal.has("admin"):
        raise ApiProblem("forbidden", "promoting or rolling back in prod needs the role 'admin'", required_role="admin")


@router.post("/api/procedures/{procedure_id}/{version}/promote")
async def promote(principal: auth.Operator,
                  request: Request, db: deps.Pool, procedure_id: str, version: str, body: PromoteIn) -> JSONResponse:
    """Activate a version in ``target_channel``, deprecating the one active there (api.md §4.5)."""
    _prod_needs_admin(principal, body.target_channel)
    row = await _version_row(db, procedure_id, version)
    if row["status"] == "active" and row["release_channel"] == body.target_channel:
        return JSONResponse({"promoted": views.procedure_out(row), "previous_channel_version": None,
                             "diagnostics": []})
    command = PromoteProcedure(actor=principal.actor, causation_id=request.state.request_id, procedure_id=procedure_id,
                               version=version, target_channel=body.target_channel, reason=body.reason)
    outcome = await send(request, "procedure", procedure_id, command, "promote_procedure",
                         f"/api/procedures/{procedure_id}/{version}")
    if outcome is None:
        return pending(command.command_id, "promote_procedure")
    raise_if_rejected(outcome)
    projected = await ryw(request, outcome.position)
    fresh = await _version_row(db, procedure_id, version)
    d = outcome.envelope.data
    return JSONResponse({"promoted": views.procedure_out(fresh), "previous_channel_version": d.get("displaced_version"),
                         "diagnostics": d.get("diagnostics", [])},
                        headers=accepted_headers(command.command_id, outcome.position, projected))


@router.post("/api/procedures/{procedure_id}/{version}/rollback")
async def rollback(principal: auth.Operator,
                   request: Request, db: deps.Pool, procedure_id: str, version: str, body: RollbackIn) -> JSONResponse:
    """Deprecate the channel's active version and restore an earlier one (api.md §4.5)."""
    _prod_needs_admin(principal, body.target_channel)
    await _version_row(db, procedure_id, version)
    command = RollbackProcedure(actor=principal.actor, causation_id=request.state.request_id, procedure_id=procedure_id,
                                version=version, target_channel=body.target_channel,
                                rollback_to_version=body.rollback_to_version, reason=body.reason)
    outcome = await send(request, "procedure", procedure_id, command, "rollback_procedure",
                         f"/api/procedures/{procedure_id}")
    if outcome is None:
        return pending(command.command_id, "rollback_procedure")
    raise_if_rejected(outcome)
    projected = await ryw(request, outcome.position)
    restored = await _version_row(db, procedure_id, outcome.envelope.data["restored_version"])
    return JSONResponse({"restored": views.procedure_out(restored), "replaced_version": version},
                        headers=accepted_headers(command.command_id, outcome.position, projected))


async def _finish(request: Request, db: asyncpg.Pool, command: ReplaceProcedure | SetProcedureStatus, command_type: str,
                  procedure_id: str, version: str, *, detail: bool) -> JSONResponse:
    outcome = await send(request, "procedure", procedure_id, command, command_type,
                         f"/api/procedures/{procedure_id}/{version}")
    if outcome is None:
        return pending(command.command_id, command_type)
    raise_if_rejected(outcome)
    projected = await ryw(request, outcome.position)
    row = await _version_row(db, procedure_id, version)
    headers = {"ETag": f'"{row["revision"]}"', **accepted_headers(command.command_id, outcome.position, projected)}
    body = views.procedure_detail(row) if detail else views.procedure_out(row)
    return JSONResponse(body, headers=headers)
