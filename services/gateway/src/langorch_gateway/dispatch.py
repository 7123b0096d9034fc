"""Publishing commands and awaiting their outcome (api.md §1.5): one place for every router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy

from ckp_core.commands import Command
from ckp_core.events import EventEnvelope
from ckp_core.subjects import EVENT_STREAM, aggregate_filter
from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import header_position
from langorch_infra.jetstream import decode_message, publish_command

log = logging.getLogger(__name__)

# how long an ordered consumer's wait for an outcome lasts before the gateway's drain is looked at again
OUTCOME_POLL_S = 0.25


@dataclass(frozen=True)
class Outcome:
    """The events one command caused on its aggregate (its first one decides accepted vs rejected)."""

    envelope: EventEnvelope
    position: int


async def send(request: Request, aggregate: str, aggregate_id: str, command: Command,
               command_type: str, resource: str | None = None, *, msg_id: str | None = None) -> Outcome | None:
    """Publish ``command`` and wait for the first event it caused on ``aggregate_id`` (None on timeout).

    The outcome is awaited before the command is published, so it cannot be missed: as the gateway's projector
    receives it when the projector is live (it receives every event anyway), else on an ordered consumer of the
    aggregate's events created for this command (one JetStream API request more, and a consumer on the server).
    The command is logged first (``api_command_log``) so ``GET /api/commands/{id}`` can report it, pending or
    decided.
    """
    app = clients(request)
    require_nats(request)
    js, settings, metrics = app.js, app.settings, app.metrics
    fixed_id = getattr(request.state, "command_id", None)
    if fixed_id:  # an idempotent request: the command id (hence Nats-Msg-Id) belongs to its Idempotency-Key
        command.command_id = fixed_id
    expected = app.projector.expect(command.command_id, aggregate, aggregate_id)
    sub = None if expected is not None else await js.subscribe(
        aggregate_filter(aggregate, aggregate_id), ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW), stream=EVENT_STREAM)
    outcome: Outcome | None = None
    try:
        await app.pool.execute(
            """INSERT INTO api_command_log (command_id, command_type, actor, aggregate, aggregate_id, resource,
                 submitted_at) VALUES ($1, $2, $3, $4, $5, $6, now()) ON CONFLICT (command_id) DO NOTHING""",
            command.command_id, command_type, command.actor.render(), aggregate, aggregate_id, resource)
        await publish_command(js, command, msg_id=msg_id)
        deadline = asyncio.get_running_loop().time() + settings.command_timeout_s
        # a gateway that stops answers before the server cuts the request off: still pending, as at the timeout
        if expected is not None and await app.drain.settle(expected, settings.command_timeout_s):
            stored = expected.result()
            outcome = Outcome(stored.envelope, stored.position)
        while sub is not None and outcome is None and not app.drain.released:
            remaining = min(deadline - asyncio.get_running_loop().time(), OUTCOME_POLL_S)
            if remaining <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=remaining)
            except NatsTimeoutError:
                continue  # until the deadline, or the drain's end
            stored = decode_message(msg)
            if stored.envelope.causation_id == command.command_id:
                outcome = Outcome(stored.envelope, stored.position)
    finally:
        if expected is not None:
            app.projector.forget(command.command_id, expected)
        if sub is not None:
            with contextlib.suppress(NatsError, OSError):  # the connection may be closed or draining already
                await sub.unsubscribe()
    state = "pending" if outcome is None else (
        "rejected" if outcome.envelope.type == "command_rejected" else "accepted")
    metrics.commands.labels(command_type=command_type, outcome=state).inc()
    return outcome


def require_nats(request: Request) -> None:
    """503 ``unavailable`` at once while the gateway's NATS connection is down, before anything is logged or
    published: the connection keeps no reconnect buffer, so nothing of this request reaches NATS later (a client
    told 503 may send it again; with the same ``Idempotency-Key`` a repeat is recognised whatever happened)."""
    if not clients(request).nc.is_connected:
        raise ApiProblem("unavailable", "NATS is unreachable; nothing was sent: retry after Retry-After seconds")


def raise_if_rejected(outcome: Outcome) -> None:
    """A ``command_rejected`` outcome becomes the problem response named by its code."""
    if outcome.envelope.type == "command_rejected":
        d = outcome.envelope.data
        extra: dict[str, Any] = dict(d.get("extra") or {})
        errors = extra.pop("errors", None)
        raise ApiProblem(d["code"], d["detail"], errors=errors, **extra)


async def ryw(request: Request, position: int) -> bool:
    """Wait (bounded) until the projection has applied ``position``; False when it did not in time."""
    app = clients(request)
    started = time.monotonic()
    # a gateway that stops ends the wait before the server cuts the request off: as at the timeout (stale)
    reached = await app.projector.wait(position, app.settings.ryw_timeout_ms / 1000)
    app.metrics.ryw_wait.observe(time.monotonic() - started)
    if not reached:
        log.warning("projection did not reach %s within the RYW timeout", position)
    return reached


async def min_position(request: Request) -> dict[str, str]:
    """Honour ``X-LangOrch-Min-Position``; returns the consistency headers of the answer."""
    raw = request.headers.get("x-langorch-min-position")
    headers: dict[str, str] = {}
    if raw and not await ryw(request, header_position("X-LangOrch-Min-Position", raw)):
        headers["X-LangOrch-Consistency"] = "stale"
    headers["X-LangOrch-Position"] = str(clients(request).projector.served)
    return headers


def pending(command_id: str, command_type: str) -> JSONResponse:
    """202: no outcome in time; the command stays durable and is processed once (api.md §1.5)."""
    return JSONResponse(
        {"command_id": command_id, "command_type": command_type, "status": "pending",
         "location": f"/api/commands/{command_id}"},
        status_code=202, headers={"Location": f"/api/commands/{command_id}", "X-LangOrch-Command-ID": command_id})


def accepted_headers(command_id: str, position: int, projected: bool = True) -> dict[str, str]:
    """Headers of an accepted command; ``projected`` False (the read-your-writes wait ran out) marks the view
    served from the projection as ``X-LangOrch-Consistency: stale``, as for ``X-LangOrch-Min-Position``."""
    headers = {"X-LangOrch-Command-ID": command_id, "X-LangOrch-Position": str(position)}
    if not projected:
        headers["X-LangOrch-Consistency"] = "stale"
    return headers
