"""Audit records the gateway writes itself (api.md §12): outcomes of what it decides without a service — the
aggregates it owns (projects), state conflicts it refuses before publishing a command, run cleanup — and the
recorded reads and redemptions (``checkpoint_viewed``, ``secret_mgmt/redeem``). Commands it publishes are
audited by the service that decides them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ckp_core.audit import AuditEntry, Outcome, command_entry, record_entry
from ckp_core.commands import Command
from ckp_core.events import Actor
from langorch_gateway import auth
from langorch_gateway.auth import Principal
from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem
from langorch_infra.audit import AuditWriter

CONFLICT = 409  # a refusal because of the resource's state: the command was decided, and rejected


async def write(request: Request, entry: AuditEntry) -> None:
    """Publish one record (best effort: a failure is logged by the writer, never answered as an error)."""
    await AuditWriter(clients(request).js).write(entry)


async def decided(request: Request, category: str, action: str, *, resource_type: str, resource_id: str | None,
                  outcome: Outcome = "accepted", meta: dict[str, Any] | None = None, code: str | None = None,
                  detail: str | None = None, actor: Actor | None = None, event_id: str | None = None,
                  correlation_id: str | None = None) -> None:
    """Record something the gateway decided or served itself (by the request's principal unless ``actor``)."""
    actor = actor or auth.actor(request)
    entry = record_entry(category, action, actor, outcome=outcome, resource_type=resource_type,
                         resource_id=resource_id, request_id=request.state.request_id, meta=meta, code=code,
                         detail=detail, correlation_id=correlation_id, auth_disabled=auth_disabled(request, actor))
    if event_id is not None:  # the outcome's own id: a record written twice for it is projected once
        entry.event_id = event_id
    await write(request, entry)


def auth_disabled(request: Request, actor: Actor) -> bool:
    """Whether a record of this request is flagged ``auth_disabled`` (api.md §2.4): it was served as the anonymous
    principal of auth-disabled mode (an anonymous request to an open route counts when auth is off)."""
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        return principal.auth_disabled
    return actor.kind == "anonymous" and not clients(request).settings.auth_enabled


async def refused(request: Request, command: Command, problem: ApiProblem) -> ApiProblem:
    """Record a command the gateway refuses on the resource's state (409) and return the problem to raise."""
    await write(request, command_entry(command, "rejected", code=problem.code, detail=problem.detail))
    return problem


async def noop(request: Request, command: Command) -> None:
    """Record a command the gateway answers from the current state without publishing it (already done)."""
    await write(request, command_entry(command, "accepted", extra_meta={"noop": True}))


async def refused_decision(request: Request, category: str, action: str, resource_type: str,
                           resource_id: str | None, problem: ApiProblem) -> ApiProblem:
    """Record a refusal of something the gateway decides itself and return the problem to raise."""
    await decided(request, category, action, resource_type=resource_type, resource_id=resource_id,
                  outcome="rejected", code=problem.code, detail=problem.detail)
    return problem


@contextlib.asynccontextmanager
async def refusals_audited(request: Request, category: str, action: str, *, resource_type: str,
                           resource_id: str | None, meta: dict[str, Any] | None = None,
                           statuses: tuple[int, ...] = (CONFLICT,)) -> AsyncIterator[None]:
    """Audit a refusal with one of ``statuses`` (by default a state conflict, 409) raised inside the block as a
    rejected ``category/action``; other 4xx (malformed requests) are not recorded."""
    try:
        yield
    except ApiProblem as problem:
        if problem.status in statuses:
            await decided(request, category, action, resource_type=resource_type, resource_id=resource_id,
                          outcome="rejected", meta=meta, code=problem.code, detail=problem.detail)
        raise
