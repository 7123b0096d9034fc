"""Submitting a run's creation (``POST /api/runs``, ``POST /api/runs/{id}/rerun``): the runtime, the run's single
writer, decides ``lo.cmd.run.create``; the gateway waits for the outcome as for every command (api.md §1.5)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from ckp_core.commands import CreateRun
from langorch_gateway import views
from langorch_gateway.admission import admitted
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import accepted_headers, pending, raise_if_rejected, ryw, send

COMMAND_TYPE = "start_run"
"""What ``GET /api/commands/{id}`` and a 202 call a run's creation (it creates the run and starts it)."""


async def submit(request: Request, command: CreateRun) -> JSONResponse:
    """Publish ``command`` and answer with its outcome: 201 with the run (``Location``, ``X-LangOrch-Command-ID``
    and ``X-LangOrch-Position`` of ``run_created``), the problem of a ``command_rejected``, or 202 pending.

    An idempotent request's command id comes from its ``Idempotency-Key`` (set before the message id is derived
    from it, so a republish after a gateway crash is dropped by JetStream). Refused with 429 first while the
    runtime's backlog is at the admission limit (:mod:`langorch_gateway.admission`)."""
    fixed_id = getattr(request.state, "command_id", None)
    if fixed_id:
        command.command_id = fixed_id
    run_id = command.run_id
    async with admitted(request):
        outcome = await send(request, "run", run_id, command, COMMAND_TYPE, f"/api/runs/{run_id}",
                             msg_id=command.msg_id)
    if outcome is None:
        return pending(command.command_id, COMMAND_TYPE)
    raise_if_rejected(outcome)
    await ryw(request, outcome.position)
    row = await clients(request).pool.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
    if row is None:
        return pending(command.command_id, COMMAND_TYPE)
    return JSONResponse(views.run_out(row), status_code=201, headers={
        "Location": f"/api/runs/{run_id}", **accepted_headers(command.command_id, outcome.position)})
