"""Submitting a fire and answering it (api.md §10.2, §10.3, §10.5): one place for the manual fire and the webhook
intake, so both give the same answer to the same outcome of the triggers service.

The triggers service decides a ``FireTrigger`` with ``trigger_fired {run_id}`` (the run is created) or
``trigger_fire_skipped {outcome, reason, extra}``; a skip becomes the problem of its outcome: ``duplicate`` →
409 ``duplicate_delivery``, ``throttled`` → 429 ``max_concurrent_runs`` with ``Retry-After``, anything else →
the problem its reason names (``invalid_input_vars`` from the run's creation, …).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ckp_core.commands import FireTrigger
from ckp_core.triggers import trigger_id
from langorch_gateway.admission import admitted
from langorch_gateway.dispatch import accepted_headers, pending, raise_if_rejected, ryw, send
from langorch_gateway.problems import ApiProblem

DEFAULT_RETRY_AFTER_S = 5
"""``Retry-After`` of a 429 when the triggers service did not say when a slot may be free."""


@dataclass(frozen=True)
class FireAnswer:
    response: JSONResponse
    started: bool
    """True when the run was created; False for the 202 pending answer (no outcome within the timeout)."""


def retry_after(value: Any) -> int:
    """Whole seconds for ``Retry-After`` (at least 1): the service's hint, else :data:`DEFAULT_RETRY_AFTER_S`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return DEFAULT_RETRY_AFTER_S
    return max(1, math.ceil(value))


def skipped_problem(data: dict[str, Any]) -> ApiProblem:
    """The problem answering a ``trigger_fire_skipped`` event's data."""
    extra: dict[str, Any] = dict(data.get("extra") or {})
    errors = extra.pop("errors", None)
    detail = str(data.get("detail") or data.get("reason") or "the fire was refused")
    outcome = data.get("outcome")
    if outcome == "duplicate":
        return ApiProblem("duplicate_delivery", detail, **extra)
    if outcome == "throttled":
        return ApiProblem("max_concurrent_runs", detail, headers={"Retry-After": str(retry_after(
            extra.get("retry_after_s")))}, active_runs=extra.get("active_runs"), limit=extra.get("limit"))
    return ApiProblem(str(data.get("reason")), detail, errors=errors, **extra)


async def submit_fire(request: Request, command: FireTrigger, *, msg_id: str | None = None) -> FireAnswer:
    """Publish ``command`` (``Nats-Msg-Id``: ``msg_id``, default the command's own), wait for its outcome and
    answer 202 ``FireOut`` once the run is visible; a refusal is raised as its problem."""
    fixed_id = getattr(request.state, "command_id", None)
    if fixed_id:  # an Idempotency-Key names the command, hence its Nats-Msg-Id
        command.command_id = fixed_id
    procedure_id, version = command.procedure_id, command.version
    async with admitted(request):  # a fire creates a run: refused like POST /api/runs while the runtime is behind
        outcome = await send(request, "trigger", trigger_id(procedure_id, version), command, "fire_trigger",
                             resource=f"/api/triggers/{procedure_id}/{version}", msg_id=msg_id or command.msg_id)
    if outcome is None:
        return FireAnswer(pending(command.command_id, "fire_trigger"), started=False)
    raise_if_rejected(outcome)
    data = outcome.envelope.data
    projected = await ryw(request, outcome.position)  # the fire is in the history when the answer arrives
    if outcome.envelope.type == "trigger_fire_skipped":
        raise skipped_problem(data)
    run_id = str(data["run_id"])
    body = {"run_id": run_id, "procedure_id": procedure_id, "procedure_version": version,
            "trigger_type": command.trigger_type, "triggered_by": command.triggered_by, "status": "created"}
    return FireAnswer(JSONResponse(body, status_code=202, headers={
        "Location": f"/api/runs/{run_id}", **accepted_headers(command.command_id, outcome.position, projected)}),
        started=True)
