"""The ``projects`` projection (api.md §9): one row per project."""

from __future__ import annotations

from ckp_core.events import ProjectCreated, ProjectDeleted, ProjectUpdated
from langorch_gateway.projections.base import Conn, Projection, Recorded

PROJECTION = Projection("projects", "project", ("projects",))


@PROJECTION.handles
async def created(conn: Conn, event: ProjectCreated, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO projects (project_id, name, description, created_at, created_by, updated_at, seq, position)
           VALUES ($1,$2,$3,$4,$5,$4,$6,$7) ON CONFLICT (project_id) DO NOTHING""",
        rec.aggregate_id, event.name, event.description, rec.at, rec.actor, rec.seq, rec.position)


@PROJECTION.handles
async def updated(conn: Conn, event: ProjectUpdated, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE projects SET name = $2, description = $3, updated_at = $4, seq = $5, position = $6
           WHERE project_id = $1""",
        rec.aggregate_id, event.name, event.description, rec.at, rec.seq, rec.position)


@PROJECTION.handles
async def deleted(conn: Conn, event: ProjectDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM projects WHERE project_id = $1", rec.aggregate_id)
