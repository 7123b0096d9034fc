"""The ``secrets`` projection (api.md §11): one row per secret metadata record, with its last resolution check.
Never a value: the events carry none."""

from __future__ import annotations

from ckp_core.events import SecretChecked, SecretCreated, SecretDeleted, SecretUpdated, format_time
from langorch_gateway.projections.base import Conn, Projection, Recorded, to_json

PROJECTION = Projection("secrets", "secret", ("secrets",))


@PROJECTION.handles
async def created(conn: Conn, event: SecretCreated, rec: Recorded) -> None:
    # a name deleted and created again starts a fresh row (its old check no longer applies)
    await conn.execute(
        """INSERT INTO secrets (name, provider, provider_ref, description, tags, last_check, created_at,
                                created_by, updated_at, seq, position)
           VALUES ($1,$2,$3,$4,$5::jsonb,NULL,$6,$7,$6,$8,$9)
           ON CONFLICT (name) DO UPDATE SET provider = $2, provider_ref = $3, description = $4, tags = $5::jsonb,
               last_check = NULL, created_at = $6, created_by = $7, updated_at = $6, seq = $8, position = $9
           WHERE secrets.position < $9""",
        rec.aggregate_id, event.provider, event.provider_ref, event.description, to_json(event.tags), rec.at,
        rec.actor, rec.seq, rec.position)


@PROJECTION.handles
async def updated(conn: Conn, event: SecretUpdated, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE secrets SET provider = $2, provider_ref = $3, description = $4, tags = $5::jsonb, updated_at = $6,
                  seq = $7, position = $8
           WHERE name = $1""",
        rec.aggregate_id, event.provider, event.provider_ref, event.description, to_json(event.tags), rec.at,
        rec.seq, rec.position)


@PROJECTION.handles
async def checked(conn: Conn, event: SecretChecked, rec: Recorded) -> None:
    check = {"ok": event.ok, "checked_at": format_time(rec.at), "error": event.error}
    await conn.execute("UPDATE secrets SET last_check = $2::jsonb, seq = $3, position = $4 WHERE name = $1",
                       rec.aggregate_id, to_json(check), rec.seq, rec.position)


@PROJECTION.handles
async def deleted(conn: Conn, event: SecretDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM secrets WHERE name = $1", rec.aggregate_id)
