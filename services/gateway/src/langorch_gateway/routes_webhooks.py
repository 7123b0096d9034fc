"""Webhook intake (api.md §10.5): ``POST /api/triggers/webhook/{procedure_id}``.

Open route: the caller proves itself with an HMAC signature over the exact bytes it sent, with the secret the
registration names (``webhook_secret``, resolved through the secret providers). Everything is checked here,
before anything is published, so unsigned or forged traffic never reaches NATS:

1. a declared ``Content-Length`` above ``webhook_max_body_bytes`` → 413 at once;
2. the procedure's most recently updated enabled webhook registration of an ``active`` version → else 404;
3. the body, read as it streams in and abandoned past the cap → 413;
4. the secret (fail closed: unresolvable → 401 ``invalid_signature``, logged without any value) and the
   signature (:func:`ckp_core.webhook_signing.verify_signature`) → 401 ``invalid_signature`` /
   ``stale_signature``;
5. the body as inputs (non-UTF-8 → 415; a string no event could carry → 422 ``invalid_input_vars``).

Then the fire is a ``FireTrigger`` like a manual one (:mod:`langorch_gateway.fires`): the triggers service applies
the dedupe window and the concurrency limit and the runtime validates the merged inputs.
"""

from __future__ import annotations

import logging
import re

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from ckp_core.commands import FireTrigger
from ckp_core.events import Actor
from ckp_core.ids import new_id
from ckp_core.triggers import trigger_id
from ckp_core.webhook_signing import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookBodyError,
    check_body_size,
    sha256_hex,
    verify_signature,
    webhook_body_inputs,
    webhook_dedupe_key,
)
from langorch_gateway.deps import clients
from langorch_gateway.fires import submit_fire
from langorch_gateway.problems import ApiProblem
from langorch_gateway.text_safety import MAX_DEPTH, MESSAGE, SURROGATE_MESSAGE, nul_paths, surrogate_paths, too_deep
from langorch_infra.secret_providers.base import SecretError

log = logging.getLogger(__name__)
router = APIRouter()

PROCEDURE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
REGISTRATION = """SELECT t.procedure_id, t.version, t.webhook_secret, t.signature_scheme, t.input_vars, p.project_id
    FROM triggers t JOIN procedures p ON p.procedure_id = t.procedure_id AND p.version = t.version
    WHERE t.procedure_id = $1 AND t.trigger_type = 'webhook' AND t.enabled AND p.status = 'active'
    ORDER BY t.updated_at DESC, t.trigger_id LIMIT 1"""
METRIC_OUTCOME = {
    "invalid_signature": "invalid_signature", "stale_signature": "stale_signature",
    "payload_too_large": "too_large", "unsupported_media_type": "unsupported_media",
    "invalid_input_vars": "invalid_input", "duplicate_delivery": "duplicate", "max_concurrent_runs": "throttled",
    "rate_limited": "throttled", "not_found": "not_found",
}
"""``langorch_webhook_requests_total{outcome}`` of a refusal by its problem code (any other code: ``refused``)."""
MESSAGE_ROOM = 16 * 1024
"""Bytes a NATS message needs besides the inputs it carries (the run creation's and ``run_created``'s other
members, headers)."""


def client_ip(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


async def read_capped(request: Request, max_bytes: int) -> bytes:
    """The raw body, never holding more than ``max_bytes + 1`` bytes: 413 as soon as it is larger (a body sent
    without ``Content-Length``, or longer than it declared)."""
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk[:max_bytes + 1 - len(body)]
            check_body_size(len(body), max_bytes)
    except ClientDisconnect:  # the sender went away mid-body: nothing to verify, nobody to answer
        raise ApiProblem("invalid_body", "the body ended before it was complete") from None
    return bytes(body)


async def registration(db: asyncpg.Pool, procedure_id: str) -> asyncpg.Record:
    row = await db.fetchrow(REGISTRATION, procedure_id) if PROCEDURE_ID.fullmatch(procedure_id) else None
    if row is None:
        raise ApiProblem("not_found", f"procedure {procedure_id} has no enabled webhook trigger on an active "
                         "version", resource="trigger")
    return row


async def signing_secret(request: Request, name: str, procedure_id: str) -> str:
    """The registration's secret; any failure to resolve it refuses the request like a wrong signature."""
    try:
        return await clients(request).secret_resolver.resolve(name)
    except SecretError as exc:
        log.warning("webhook for %s refused: its secret %r does not resolve (%s from %s)", procedure_id, name,
                    exc.code, exc.provider)
        raise ApiProblem("invalid_signature", "the signature cannot be verified") from None


def storable(inputs: dict[str, object]) -> None:
    """422 for inputs no event could carry (U+0000, a lone surrogate, nesting past the serialiser's depth)."""
    errors: dict[str, list[str]] = {}
    for path in nul_paths(inputs):
        errors.setdefault(f"input_vars.{path}", []).append(MESSAGE)
    for path in surrogate_paths(inputs):
        errors.setdefault(f"input_vars.{path}", []).append(SURROGATE_MESSAGE)
    deep = too_deep(inputs)
    if deep is not None:
        errors.setdefault(f"input_vars.{deep}", []).append(f"Must not nest deeper than {MAX_DEPTH} levels")
    if errors:
        raise ApiProblem("invalid_input_vars", "the body holds values a run's inputs cannot carry", errors=errors)


def carried(command: FireTrigger, static_inputs: object, max_payload: int) -> None:
    """413 when the fire's inputs would not fit in one NATS message (the server's ``max_payload``, 1 MiB unless
    configured larger): the command, then the run's creation with the registration's inputs merged in, carry them."""
    size = len(command.model_dump_json().encode()) + len(str(static_inputs or "").encode()) + MESSAGE_ROOM
    if size > max_payload:
        raise ApiProblem("payload_too_large", f"the body's inputs need about {size} bytes in a message; NATS "
                         f"carries at most {max_payload} bytes (its max_payload)")


async def intake(request: Request, procedure_id: str) -> JSONResponse:
    app = clients(request)
    settings = app.settings
    max_bytes = settings.webhook_max_body_bytes
    try:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit():
            check_body_size(int(declared), max_bytes)  # before any lookup: a sender gets 413 at once
        row = await registration(app.pool, procedure_id)
        body = await read_capped(request, max_bytes)
        secret = await signing_secret(request, row["webhook_secret"] or "", procedure_id)
        check = verify_signature(secret, body, request.headers, scheme=row["signature_scheme"],
                                 tolerance_s=settings.webhook_tolerance_s)
        if check.problem_code is not None:
            raise ApiProblem(check.problem_code, check.detail)
        content_type = request.headers.get("content-type")
        inputs = webhook_body_inputs(body, content_type, max_bytes=max_bytes)
    except WebhookBodyError as exc:
        raise ApiProblem(exc.code, str(exc), status=exc.status) from None
    storable(inputs)
    ip = client_ip(request)
    request_id = request.state.request_id
    procedure, version = row["procedure_id"], row["version"]
    command = FireTrigger(
        actor=Actor(kind="trigger", id=trigger_id(procedure, version)), causation_id=request_id,
        procedure_id=procedure, version=version, run_id=new_id(), trigger_type="webhook",
        triggered_by=f"webhook:{ip}", input_vars=inputs, dedupe_key=webhook_dedupe_key(body),
        project_id=row["project_id"], source_detail={"request_id": request_id, "client_ip": ip,
                                                     "content_type": content_type, "body_sha256": sha256_hex(body)})
    carried(command, row["input_vars"], app.nc.max_payload)
    # the message id is the fire's own (fire:<command id>): a sender's repeated X-Request-ID must not make JetStream
    # drop a new delivery as a duplicate (the dedupe window is the registration's business)
    answer = await submit_fire(request, command, msg_id=command.msg_id)
    app.metrics.webhook_requests.labels(outcome="accepted" if answer.started else "pending").inc()
    return answer.response


OPENAPI = {  # the route reads the raw body itself, so the API document is told what it takes
    "requestBody": {"required": False, "description": "The raw body, signed as sent (any content type).",
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
    "parameters": [
        {"name": SIGNATURE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
         "description": "sha256=<lowercase hex HMAC-SHA256>; several comma-separated values while rotating."},
        {"name": TIMESTAMP_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
         "description": "Unix seconds, signed with the body (signature_scheme timestamped)."},
    ],
}


@router.post("/api/triggers/webhook/{procedure_id}", status_code=202, openapi_extra=OPENAPI)
async def webhook(request: Request, procedure_id: str) -> JSONResponse:
    """Fire the procedure's webhook registration with a signed body: 202 ``FireOut``; 401
    ``invalid_signature`` / ``stale_signature``; 404; 409 ``duplicate_delivery``; 413; 415; 422
    ``invalid_input_vars``; 429 ``max_concurrent_runs``, or ``rate_limited`` while the runtime is behind
    (admission control)."""
    try:
        return await intake(request, procedure_id)
    except ApiProblem as refused:
        clients(request).metrics.webhook_requests.labels(
            outcome=METRIC_OUTCOME.get(refused.code, "refused")).inc()
        raise
