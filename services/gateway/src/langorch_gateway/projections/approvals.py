"""The ``approvals`` projection (api.md §6): one row per approval, from the approval aggregate's events (the run's
own ``approval_requested`` belongs to the run projections)."""

from __future__ import annotations

from typing import Any

from ckp_core.approvals import parse_time
from ckp_core.events import ApprovalCanceled, ApprovalDecided, ApprovalRequested, ApprovalTimedOut
from langorch_gateway.projections.base import Conn, Projection, Recorded, to_json, to_json_or_null

PROJECTION = Projection("approvals", "approval", ("approvals",))


@PROJECTION.handles
async def requested(conn: Conn, event: ApprovalRequested, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO approvals (approval_id, run_id, procedure_id, procedure_version, node_id, node_name,
             project_id, prompt, context_data, decision_type, options, input_schema, status, created_at,
             expires_at, timeout_action, escalation_contact, approval_level, updated_at, seq, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9::jsonb,$10,$11::jsonb,$12::jsonb,'pending',$13,$14,$15,$16,$17,
             $13,$18,$19)
           ON CONFLICT (approval_id) DO NOTHING""",
        rec.aggregate_id, event.run_id or rec.envelope.correlation_id, event.procedure_id, event.procedure_version,
        event.node_id, event.node_name, event.project_id, event.prompt or "", to_json_or_null(event.context_data),
        event.decision_type or "approve_reject", to_json(event.options or []), to_json(event.input_schema or {}),
        rec.at, parse_time(event.expires_at), event.timeout_action, event.escalation_contact, event.approval_level,
        rec.seq, rec.position)


async def _decided(conn: Conn, rec: Recorded, *, status: str, decision: str, decided_by: str, decided_at: str,
                   comment: str | None, payload: Any) -> None:
    await conn.execute(
        """UPDATE approvals SET status = $2, decision = $3, decided_by = $4, decided_at = $5, comment = $6,
             decision_payload = $7::jsonb, updated_at = $8, seq = $9, position = $10
           WHERE approval_id = $1 AND seq < $9""",
        rec.aggregate_id, status, decision, decided_by, parse_time(decided_at), comment, to_json_or_null(payload),
        rec.at, rec.seq, rec.position)


@PROJECTION.handles
async def decided(conn: Conn, event: ApprovalDecided, rec: Recorded) -> None:
    await _decided(conn, rec, status=event.status, decision=event.decision, decided_by=event.decided_by,
                   decided_at=event.decided_at, comment=event.comment, payload=event.payload)


@PROJECTION.handles
async def timed_out(conn: Conn, event: ApprovalTimedOut, rec: Recorded) -> None:
    await _decided(conn, rec, status=event.status, decision=event.decision, decided_by=event.decided_by,
                   decided_at=event.decided_at, comment=None, payload=None)


@PROJECTION.handles
async def canceled(conn: Conn, event: ApprovalCanceled, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE approvals SET status = 'canceled', updated_at = $2, seq = $3, position = $4
           WHERE approval_id = $1 AND seq < $3""", rec.aggregate_id, rec.at, rec.seq, rec.position)
