"""The ``run_events`` projection: every event of a run as ``GET /api/runs/{id}/events`` serves it (api.md §5.3).

The payload is the event's data as written (after upcasting), with the position fields ``node_id``, ``step_id``
and ``attempt`` lifted into columns; events of types this release does not know are recorded too. A deleted
run's events go with it.
"""

from __future__ import annotations

from typing import Any

from ckp_core.events import RunDeleted
from langorch_gateway.projections.base import Conn, Projection, Recorded, to_json

PROJECTION = Projection("run_events", "run", ("run_events",))

LIFTED = ("node_id", "step_id", "attempt")


@PROJECTION.otherwise
async def recorded(conn: Conn, event: Any, rec: Recorded) -> None:
    payload = dict(rec.envelope.data)
    node_id, step_id, attempt = (payload.pop(k, None) for k in LIFTED)
    await conn.execute(
        """INSERT INTO run_events (run_id, seq, event_id, stream_seq, event_type, node_id, step_id, attempt,
             actor, payload, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb,$11)
           ON CONFLICT DO NOTHING""",
        rec.aggregate_id, rec.seq, rec.envelope.event_id, rec.position, rec.envelope.type, node_id, step_id, attempt,
        rec.actor, to_json(payload), rec.at,
    )


@PROJECTION.handles
async def deleted(conn: Conn, event: RunDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM run_events WHERE run_id = $1", rec.aggregate_id)
