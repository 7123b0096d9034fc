"""The ``audit_log`` projection (api.md §12), applied from ``LO_AUDIT`` by the audit projector."""

from __future__ import annotations

from ckp_core.audit import AuditEntry
from langorch_gateway.projections.base import Conn, to_json


async def apply_audit_entry(conn: Conn, entry: AuditEntry, position: int) -> None:
    """One ``LO_AUDIT`` record into ``audit_log``; a record already there (same event id) is kept as it is."""
    await conn.execute(
        """INSERT INTO audit_log (event_id, ts, category, action, outcome, actor, actor_kind, description,
             resource_type, resource_id, request_id, command_id, correlation_id, auth_disabled, meta, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15::jsonb,$16)
           ON CONFLICT (event_id) DO NOTHING""",
        entry.event_id, entry.ts, entry.category, entry.action, entry.outcome, entry.actor, entry.actor_kind,
        entry.description, entry.resource_type, entry.resource_id, entry.request_id, entry.command_id,
        entry.correlation_id, entry.auth_disabled, to_json(entry.meta), position,
    )
