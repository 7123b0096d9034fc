"""The ``procedures`` and ``procedure_deployments`` projections (api.md §4): one row per procedure version, and one
per promotion or rollback."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ckp_core.events import (
    ProcedureImported,
    ProcedurePromoted,
    ProcedureReplaced,
    ProcedureRolledBack,
    ProcedureStatusChanged,
    ProcedureVersionDeleted,
)
from langorch_gateway.projections.base import Conn, Projection, Recorded, to_json, to_json_or_null

PROJECTION = Projection("procedures", "procedure", ("procedures", "procedure_deployments"))

SEARCH_KEYS = ("domain", "business_domain", "intents", "primary_intents", "keywords", "tags")


def search_text(procedure_id: str, name: str | None, description: str | None, ckp_json: dict[str, Any]) -> str:
    """Lower-cased text that ``search`` matches: id, name, description, retrieval domain/intents/keywords/tags."""
    parts: list[str] = [procedure_id, name or "", description or ""]
    meta = ckp_json.get("retrieval_metadata")
    if isinstance(meta, dict):
        for key in SEARCH_KEYS:
            value = meta.get(key)
            if isinstance(value, list):
                parts.extend(str(x) for x in value)
            elif value is not None:
                parts.append(str(value))
    return "\n".join(parts).lower()


def _retrieval(ckp_json: dict[str, Any]) -> str | None:
    return to_json_or_null(ckp_json.get("retrieval_metadata"))


def _search(event: ProcedureImported | ProcedureReplaced) -> str:
    return search_text(event.procedure_id, event.name, event.description, event.ckp_json)


@PROJECTION.handles
async def imported(conn: Conn, event: ProcedureImported, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO procedures (procedure_id, version, name, description, status, release_channel,
             project_id, tags, content_hash, compiler_version, ir_key, ckp_json, variables_schema, trigger,
             effective_date, diagnostics, revision, created_at, created_by, updated_at, position,
             retrieval_metadata, search_text)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8::jsonb,$9,$10,$11,$12::jsonb,$13::jsonb,$14::jsonb,$15,$16::jsonb,
             1,$17,$18,$17,$19,$20::jsonb,$21)
           ON CONFLICT (procedure_id, version) DO NOTHING""",
        event.procedure_id, event.version, event.name, event.description, event.status, event.release_channel,
        event.project_id, to_json(event.tags), event.content_hash, event.compiler_version, event.ir_key,
        to_json(event.ckp_json), to_json(event.variables_schema), to_json_or_null(event.trigger),
        event.effective_date, to_json(event.diagnostics), rec.at, rec.actor, rec.position,
        _retrieval(event.ckp_json), _search(event),
    )


@PROJECTION.handles
async def replaced(conn: Conn, event: ProcedureReplaced, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE procedures SET name = $3, description = $4, tags = $5::jsonb, content_hash = $6,
             compiler_version = $7, ckp_json = $8::jsonb, variables_schema = $9::jsonb, trigger = $10::jsonb,
             effective_date = $11, diagnostics = $12::jsonb, retrieval_metadata = $13::jsonb,
             search_text = $14, revision = revision + 1, updated_at = $15
           WHERE procedure_id = $1 AND version = $2""",
        rec.aggregate_id, event.version, event.name, event.description, to_json(event.tags), event.content_hash,
        event.compiler_version, to_json(event.ckp_json), to_json(event.variables_schema),
        to_json_or_null(event.trigger), event.effective_date, to_json(event.diagnostics), _retrieval(event.ckp_json),
        _search(event), rec.at,
    )


@PROJECTION.handles
async def version_deleted(conn: Conn, event: ProcedureVersionDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM procedures WHERE procedure_id = $1 AND version = $2", rec.aggregate_id,
                       event.version)


@PROJECTION.handles
async def status_changed(conn: Conn, event: ProcedureStatusChanged, rec: Recorded) -> None:
    await _deprecate(conn, rec.aggregate_id, event.displaced_version, rec.at)
    await conn.execute(
        """UPDATE procedures SET status = $3, revision = revision + 1, updated_at = $4,
             compiler_version = COALESCE($5, compiler_version), diagnostics = COALESCE($6::jsonb, diagnostics)
           WHERE procedure_id = $1 AND version = $2""",
        rec.aggregate_id, event.version, event.status, rec.at, event.compiler_version,
        to_json_or_null(event.diagnostics),
    )


@PROJECTION.handles
async def promoted(conn: Conn, event: ProcedurePromoted, rec: Recorded) -> None:
    await _deprecate(conn, rec.aggregate_id, event.displaced_version, rec.at)
    await conn.execute(
        """UPDATE procedures SET status = 'active', release_channel = $3, promoted_from_version = $4,
             promoted_at = $5, promoted_by = $6, revision = revision + 1, updated_at = $5,
             compiler_version = COALESCE($7, compiler_version), diagnostics = $8::jsonb
           WHERE procedure_id = $1 AND version = $2""",
        rec.aggregate_id, event.version, event.target_channel, event.displaced_version, rec.at, rec.actor,
        event.compiler_version, to_json(event.diagnostics),
    )
    await _deployment(conn, event, rec, "promote", event.version, event.displaced_version)


@PROJECTION.handles
async def rolled_back(conn: Conn, event: ProcedureRolledBack, rec: Recorded) -> None:
    await _deprecate(conn, rec.aggregate_id, event.version, rec.at)
    await conn.execute(
        """UPDATE procedures SET status = 'active', promoted_from_version = $3, promoted_at = $4,
             promoted_by = $5, revision = revision + 1, updated_at = $4
           WHERE procedure_id = $1 AND version = $2""",
        rec.aggregate_id, event.restored_version, event.version, rec.at, rec.actor,
    )
    await _deployment(conn, event, rec, "rollback", event.restored_version, event.version)


async def _deprecate(conn: Conn, procedure_id: str, version: str | None, at: datetime) -> None:
    if version:
        await conn.execute(
            """UPDATE procedures SET status = 'deprecated', revision = revision + 1, updated_at = $3
               WHERE procedure_id = $1 AND version = $2""", procedure_id, version, at)


async def _deployment(conn: Conn, event: ProcedurePromoted | ProcedureRolledBack, rec: Recorded, action: str,
                      deployed: str, replaced: str | None) -> None:
    await conn.execute(
        """INSERT INTO procedure_deployments (deployment_id, procedure_id, action, target_channel, deployed_version,
             replaced_version, deployed_by, deployed_at, reason, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) ON CONFLICT (deployment_id) DO NOTHING""",
        event.deployment_id, rec.aggregate_id, action, event.target_channel, deployed, replaced, rec.actor, rec.at,
        event.reason, rec.position,
    )
