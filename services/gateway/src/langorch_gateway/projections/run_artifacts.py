"""The ``run_artifacts`` projection (api.md §5.9): one row per artifact a run recorded; a deleted run's go with it."""

from __future__ import annotations

from ckp_core.events import ArtifactCreated, RunDeleted
from langorch_gateway.projections.base import Conn, Projection, Recorded

PROJECTION = Projection("run_artifacts", "run", ("run_artifacts",))


@PROJECTION.handles
async def created(conn: Conn, event: ArtifactCreated, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO run_artifacts (artifact_id, run_id, node_id, step_id, kind, name, uri, mime_type, size_bytes,
             stored, created_at, position) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)
           ON CONFLICT (artifact_id) DO NOTHING""",
        event.artifact_id, rec.aggregate_id, event.node_id, event.step_id, event.kind or "file", event.name,
        event.uri, event.mime_type, event.size_bytes, event.stored, rec.at, rec.position)


@PROJECTION.handles
async def deleted(conn: Conn, event: RunDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM run_artifacts WHERE run_id = $1", rec.aggregate_id)
