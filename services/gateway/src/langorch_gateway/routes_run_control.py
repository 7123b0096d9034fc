"""Run control (api.md §5.2, §5.4, §5.5): cancel and retry, decided by the runtime (the run's single writer)."""

from __future__ import annotations

from typing import Any

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ckp_core import runs
from ckp_core.commands import CancelRun, RetryRun
from ckp_core.errors import CommandRefused
from langorch_gateway import auditing, auth, deps, views
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import accepted_headers, pending, ryw, send
from langorch_gateway.problems import ApiProblem, refused_problem

router = APIRouter()


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=2000)


class RetryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


async def _run(request: Request, run_id: str) -> asyncpg.Record:
    db = clients(request).pool
    row = await db.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
    if row is None:
        raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
    return row


async def _after(request: Request, run_id: str, position: int, command_id: str, status: int) -> JSONResponse:
    projected = await ryw(request, position)
    row = await _run(request, run_id)
    return JSONResponse(views.run_out(row), status_code=status,
                        headers=accepted_headers(command_id, position, projected))


@router.post("/api/runs/{run_id}/cancel")
async def cancel_run(principal: auth.Operator, request: Request, run_id: str, body: CancelIn | None = None) -> Any:
    """Cancel: at once when nothing executes the run (200), else ``canceling`` until the runtime stops (202)."""
    row = await _run(request, run_id)
    status = row["status"]
    command = CancelRun(actor=principal.actor, causation_id=request.state.request_id, run_id=run_id,
                        reason=(body.reason if body else None))
    try:
        decision = runs.decide_cancel(status)
    except CommandRefused as refusal:
        raise await auditing.refused(request, command, refused_problem(refusal)) from None
    if decision == "noop":
        await auditing.noop(request, command)
        return JSONResponse(views.run_out(row), status_code=200 if status == "canceled" else 202)
    outcome = await send(request, "run", run_id, command, "cancel_run")
    if outcome is None:
        return pending(command.command_id, "cancel_run")
    code = 200 if outcome.envelope.type == "run_canceled" else 202
    return await _after(request, run_id, outcome.position, command.command_id, code)


@router.post("/api/runs/{run_id}/retry")
async def retry_run(principal: auth.Operator,
                    request: Request, db: deps.Pool, run_id: str, body: RetryIn | None = None) -> Any:
    """Retry a failed or canceled run from its failure point (``queued``)."""
    row = await _run(request, run_id)
    status = row["status"]
    command = RetryRun(actor=principal.actor, causation_id=request.state.request_id, run_id=run_id)
    try:
        runs.decide_retry(status)
    except CommandRefused as refusal:
        raise await auditing.refused(request, command, refused_problem(refusal)) from None
    version = await db.fetchval("SELECT status FROM procedures WHERE procedure_id = $1 AND version = $2",
                                row["procedure_id"], row["procedure_version"])
    if version is None or version == "archived":  # api.md §5.5: the version must exist and not be archived
        raise await auditing.refused(request, command, ApiProblem(
            "procedure_version_unavailable", f"version {row['procedure_version']} of {row['procedure_id']} is "
            f"{'archived' if version else 'deleted'}; rerun the run on another version instead"))
    outcome = await send(request, "run", run_id, command, "retry_run")
    if outcome is None:
        return pending(command.command_id, "retry_run")
    return await _after(request, run_id, outcome.position, command.command_id, 200)
