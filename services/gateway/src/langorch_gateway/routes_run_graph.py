"""``GET /api/runs/{run_id}/graph`` (api.md §5.8): the procedure's laid-out graph with each node's status in this
run, folded from the run's node events in the ``run_events`` projection.

Node status rules (the spec names the values; the folding is ours):

* ``node_started`` → ``running`` (``attempts`` counts starts: loop bodies and retries start a node again);
  ``node_completed`` → ``completed``; ``node_error`` → ``failed``; ``node_paused`` → ``paused``.
* When the run has ended, a node still ``running`` or ``paused`` was stopped by the end (a canceled run, a failed
  sibling branch, the losers of a ``wait_strategy: any``) → ``canceled``; a node that never started is ``skipped``.
  While the run is live a node that has not started is ``not_started``.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ckp_core import analysis, runs
from ckp_core.compiler import compile_document
from ckp_core.events import format_time
from langorch_gateway import auth, deps, views
from langorch_gateway.dispatch import min_position
from langorch_gateway.problems import ApiProblem

router = APIRouter()

NODE_EVENTS = ("node_started", "node_completed", "node_error", "node_paused")
_BY_EVENT = {"node_started": "running", "node_completed": "completed", "node_error": "failed",
             "node_paused": "paused"}


def fold_node_status(events: list[asyncpg.Record] | list[dict[str, Any]], node_ids: list[str],
                     last_seq: dict[str, int], run_status: str) -> dict[str, dict[str, Any]]:
    """``node_status`` of §5.8 from the run's node events in ``seq`` order."""
    out: dict[str, dict[str, Any]] = {}
    for e in events:
        node = e["node_id"]
        entry = out.setdefault(node, {"status": "not_started", "started_at": None, "ended_at": None, "attempts": 0,
                                      "last_seq": None})
        entry["status"] = _BY_EVENT[e["event_type"]]
        if e["event_type"] == "node_started":
            entry["attempts"] += 1
            entry["started_at"] = entry["started_at"] or format_time(e["created_at"])
            entry["ended_at"] = None
        elif e["event_type"] in ("node_completed", "node_error"):
            entry["ended_at"] = format_time(e["created_at"])
    ended = run_status in runs.TERMINAL_STATUSES
    for node in node_ids:
        entry = out.setdefault(node, {"status": "skipped" if ended else "not_started", "started_at": None,
                                      "ended_at": None, "attempts": 0, "last_seq": None})
        if ended and entry["status"] in ("running", "paused"):
            entry["status"] = "canceled"
    for node, entry in out.items():
        entry["last_seq"] = last_seq.get(node)
    return out


@router.get("/api/runs/{run_id}/graph")
async def run_graph(principal: auth.Viewer, request: Request, db: deps.Pool, run_id: str) -> JSONResponse:
    """RunGraphOut: GraphOut of the run's version (null with a reason once the version is deleted) and node status."""
    headers = await min_position(request)
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        run = await conn.fetchrow("SELECT run_id, procedure_id, procedure_version, status FROM runs "
                                  "WHERE run_id = $1", run_id)
        if run is None:
            raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
        version = await conn.fetchrow("SELECT ckp_json FROM procedures WHERE procedure_id = $1 AND version = $2",
                                      run["procedure_id"], run["procedure_version"])
        events = await conn.fetch("SELECT node_id, event_type, created_at FROM run_events WHERE run_id = $1 "
                                  "AND event_type = ANY($2::text[]) AND node_id IS NOT NULL ORDER BY seq",
                                  run_id, list(NODE_EVENTS))
        last_seq = {r["node_id"]: int(r["last_seq"]) for r in await conn.fetch(
            "SELECT node_id, max(seq) AS last_seq FROM run_events WHERE run_id = $1 AND node_id IS NOT NULL "
            "GROUP BY node_id", run_id)}
    graph: dict[str, Any] | None = None
    reason: str | None = None
    if version is None:
        reason = f"procedure version {run['procedure_id']} {run['procedure_version']} has been deleted"
    else:
        result = compile_document(views._json(version["ckp_json"]))
        if result.ir is None:  # stored documents compiled once; a newer compiler may refuse them
            reason = "the stored procedure version no longer compiles"
        else:
            graph = analysis.graph_view(result.ir)
    node_ids = [n["id"] for n in graph["nodes"]] if graph is not None else []
    status = fold_node_status(list(events), node_ids, last_seq, run["status"])
    current = sorted((n for n, s in status.items() if s["status"] in ("running", "paused")),
                     key=lambda n: status[n]["last_seq"] or 0)
    return JSONResponse({"run_id": run_id, "procedure_id": run["procedure_id"],
                         "procedure_version": run["procedure_version"], "graph": graph,
                         "graph_unavailable_reason": reason, "node_status": status, "current_node_ids": current},
                        headers=headers)
