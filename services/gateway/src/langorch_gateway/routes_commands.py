"""``GET /api/commands/{command_id}`` (api.md §3): what became of a command the gateway published — the
``Location`` of every 202 pending answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ckp_core.events import format_time
from langorch_gateway import auth, deps
from langorch_gateway.problems import STATUS, TITLES, ApiProblem

router = APIRouter()


@router.get("/api/commands/{command_id}")
async def get_command(principal: auth.Viewer, db: deps.Pool, store: deps.EventStore, command_id: str) -> dict[str, Any]:
    """The command, and its outcome from the aggregate's events (``pending`` until one exists)."""
    row = await db.fetchrow("SELECT * FROM api_command_log WHERE command_id = $1", command_id)
    if row is None:
        raise ApiProblem("not_found", f"command {command_id} not found", resource="command")
    if not principal.has("admin") and row["actor"] != principal.actor.render():
        raise ApiProblem("forbidden", "only the command's submitter or an admin may read it", required_role="admin")
    outcome = next((e for e in await store.read(row["aggregate"], row["aggregate_id"])
                    if e.envelope.causation_id == command_id), None)
    status, position, problem = "pending", None, None
    if outcome is not None:
        position = outcome.position
        if outcome.envelope.type == "command_rejected":
            d = outcome.envelope.data
            code = str(d.get("code"))
            status = "rejected"
            problem = {"type": f"urn:langorch:problem:{code}", "title": TITLES.get(code, code),
                       "status": STATUS.get(code, 409), "detail": d.get("detail"), "code": code,
                       **(d.get("extra") or {})}
        else:
            status = "accepted"
    return {"command_id": command_id, "command_type": row["command_type"], "actor": row["actor"],
            "submitted_at": format_time(row["submitted_at"]), "status": status, "position": position,
            "resource": row["resource"], "problem": problem}
