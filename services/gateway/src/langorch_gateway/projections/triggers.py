"""The ``triggers`` and ``trigger_fires`` projections (api.md §10): one row per registration, one per fire.

``revision`` (the ``ETag``) follows :func:`ckp_core.triggers.evolve`: 1 when (re-)registered, one more for each
update, enable and disable; fires leave it as it is. A deleted registration's row and fires are removed.
"""

from __future__ import annotations

from ckp_core.events import (
    TriggerDeleted,
    TriggerDisabled,
    TriggerEnabled,
    TriggerFired,
    TriggerFireSkipped,
    TriggerRegistered,
    TriggerUpdated,
)
from langorch_gateway.projections.base import Conn, Projection, Recorded, to_json

PROJECTION = Projection("triggers", "trigger", ("triggers", "trigger_fires"))


@PROJECTION.handles
async def registered(conn: Conn, event: TriggerRegistered | TriggerUpdated, rec: Recorded) -> None:
    fresh = isinstance(event, TriggerRegistered) and not isinstance(event, TriggerUpdated)
    if fresh:
        await conn.execute("DELETE FROM trigger_fires WHERE trigger_id = $1", rec.aggregate_id)
    await conn.execute(
        """INSERT INTO triggers (trigger_id, procedure_id, version, trigger_type, schedule, timezone, webhook_secret,
             signature_scheme, event_source, input_vars, dedupe_window_seconds, max_concurrent_runs, enabled,
             source, revision, created_at, created_by, updated_at, seq, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb,$11,$12,$13,$14,1,$15,$16,$15,$17,$18)
           ON CONFLICT (trigger_id) DO UPDATE SET trigger_type = excluded.trigger_type,
             schedule = excluded.schedule, timezone = excluded.timezone, webhook_secret = excluded.webhook_secret,
             signature_scheme = excluded.signature_scheme, event_source = excluded.event_source,
             input_vars = excluded.input_vars, dedupe_window_seconds = excluded.dedupe_window_seconds,
             max_concurrent_runs = excluded.max_concurrent_runs, enabled = excluded.enabled,
             source = excluded.source,
             revision = CASE WHEN $19 THEN 1 ELSE triggers.revision + 1 END,
             created_at = CASE WHEN $19 THEN excluded.created_at ELSE triggers.created_at END,
             created_by = CASE WHEN $19 THEN excluded.created_by ELSE triggers.created_by END,
             last_fired_at = CASE WHEN $19 THEN NULL ELSE triggers.last_fired_at END,
             last_run_id = CASE WHEN $19 THEN NULL ELSE triggers.last_run_id END,
             updated_at = excluded.updated_at, seq = excluded.seq, position = excluded.position
           WHERE triggers.seq < excluded.seq""",
        rec.aggregate_id, event.procedure_id, event.version, event.trigger_type, event.schedule, event.timezone,
        event.webhook_secret, event.signature_scheme, event.event_source, to_json(event.input_vars),
        event.dedupe_window_seconds, event.max_concurrent_runs, event.enabled, event.source, rec.at, rec.actor,
        rec.seq, rec.position, fresh)


@PROJECTION.handles
async def switched(conn: Conn, event: TriggerEnabled | TriggerDisabled, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE triggers SET enabled = $2, revision = revision + 1, updated_at = $3, seq = $4, position = $5
           WHERE trigger_id = $1 AND seq < $4""",
        rec.aggregate_id, isinstance(event, TriggerEnabled), rec.at, rec.seq, rec.position)


@PROJECTION.handles
async def deleted(conn: Conn, event: TriggerDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM triggers WHERE trigger_id = $1", rec.aggregate_id)
    await conn.execute("DELETE FROM trigger_fires WHERE trigger_id = $1", rec.aggregate_id)


@PROJECTION.handles
async def fired(conn: Conn, event: TriggerFired, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO trigger_fires (fire_id, trigger_id, fired_at, outcome, reason, run_id, trigger_type,
             triggered_by, source_detail, position)
           VALUES ($1,$2,$3,'started',NULL,$4,$5,$6,$7::jsonb,$8) ON CONFLICT (fire_id) DO NOTHING""",
        event.fire_id, rec.aggregate_id, rec.at, event.run_id, event.trigger_type, event.triggered_by,
        to_json(event.source_detail), rec.position)
    await conn.execute(
        """UPDATE triggers SET last_fired_at = $2, last_run_id = $3, seq = $4, position = $5
           WHERE trigger_id = $1 AND seq < $4""", rec.aggregate_id, rec.at, event.run_id, rec.seq, rec.position)


@PROJECTION.handles
async def skipped(conn: Conn, event: TriggerFireSkipped, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO trigger_fires (fire_id, trigger_id, fired_at, outcome, reason, run_id, trigger_type,
             triggered_by, source_detail, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9::jsonb,$10) ON CONFLICT (fire_id) DO NOTHING""",
        event.fire_id, rec.aggregate_id, rec.at, event.outcome, event.reason, event.run_id, event.trigger_type,
        event.triggered_by, to_json(event.source_detail), rec.position)
