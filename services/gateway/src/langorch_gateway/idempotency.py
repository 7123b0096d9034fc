"""Idempotent requests (api.md §1.6) for the endpoints marked ⟳.

The first request with a given ``Idempotency-Key`` (scoped to the principal) claims a row in ``api_commands``
and is processed normally; its command id is fixed by the row (so a republish after a crash carries the same
``Nats-Msg-Id`` and is dropped by JetStream). Its response is kept 24 h and replayed for a repeat with the
same body (``Idempotent-Replayed: true``), unless it was a 5xx or a 429 (nothing done: the key stays free); a
repeat while the first is in flight gets 409 ``idempotency_key_in_progress``; a different body gets 422
``idempotency_key_reused``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from fastapi import Request
from fastapi.responses import Response

from ckp_core.ids import new_id
from langorch_gateway import auth
from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem

IDEMPOTENT = [re.compile(p) for p in (
    r"^/api/procedures$", r"^/api/runs$", r"^/api/runs/[^/]+/rerun$", r"^/api/projects$", r"^/api/agents$",
    r"^/api/approvals/[^/]+/decision$", r"^/api/triggers/[^/]+/[^/]+/fire$", r"^/api/users$",
    r"^/api/auth/api-keys$",
)]
KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
KEEP = timedelta(hours=24)
ABANDONED = timedelta(minutes=2)  # an in-flight claim this old belongs to a gateway that died mid-request


def applies(request: Request) -> bool:
    return request.method == "POST" and any(p.match(request.url.path) for p in IDEMPOTENT)


def _request_hash(raw: bytes) -> str:
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        canonical = raw.decode("utf-8", "replace")
    return hashlib.sha256(canonical.encode()).hexdigest()


async def handle(request: Request, call_next: Callable[[Request], Awaitable[Response]],
                 principal: str | None = None) -> Response:
    """Process (or replay) one ⟳ request that carries ``Idempotency-Key``; the key is scoped to ``principal``, by
    default the request's authenticated principal (authenticated here, first: a request without a valid
    credential is refused before it can claim or replay anything)."""
    if principal is None:
        principal = (await auth.principal(request)).actor.render()
    key = request.headers["idempotency-key"]
    if not KEY.match(key):
        raise ApiProblem("validation_failed", "Idempotency-Key must be 1–255 printable ASCII characters",
                         errors={"header.Idempotency-Key": ["Must be 1-255 printable ASCII characters"]})
    pool = clients(request).pool
    digest = _request_hash(await request.body())
    now = datetime.now(UTC)
    command_id = new_id()
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT * FROM api_commands WHERE principal = $1 AND idempotency_key = $2 FOR UPDATE", principal, key)
        reuse_command = None
        if row is not None:
            expired = now - row["submitted_at"] > KEEP
            abandoned = row["state"] == "in_flight" and now - row["submitted_at"] > ABANDONED
            if not expired and row["request_hash"] != digest:
                raise ApiProblem("idempotency_key_reused", "this Idempotency-Key was used with another request body",
                                 errors={"header.Idempotency-Key": ["Already used with a different body"]})
            if not expired and row["state"] == "done":
                headers = json.loads(row["response_headers"] or "{}") | {"Idempotent-Replayed": "true"}
                return Response(row["response_body"], status_code=row["response_status"], headers=headers)
            if not expired and not abandoned:
                raise ApiProblem("idempotency_key_in_progress", "the first request with this Idempotency-Key is "
                                 "still being processed; retry shortly", retry_after_seconds=1)
            reuse_command = row["command_id"] if abandoned and not expired else None
            await conn.execute("DELETE FROM api_commands WHERE principal = $1 AND idempotency_key = $2",
                               principal, key)
        command_id = reuse_command or command_id
        await conn.execute(
            """INSERT INTO api_commands (principal, idempotency_key, request_hash, method, path, command_id, state,
                 submitted_at) VALUES ($1, $2, $3, $4, $5, $6, 'in_flight', $7)""",
            principal, key, digest, request.method, request.url.path, command_id, now)
    request.state.command_id = command_id
    try:
        response = await call_next(request)
    except BaseException:
        await _forget(pool, principal, key)
        raise
    body = b"".join([chunk async for chunk in response.body_iterator])  # type: ignore[attr-defined]
    if response.status_code >= 500 or response.status_code == 429:
        # a defect or an outage, or a refusal to take the request now (429: nothing was done, Retry-After says
        # when to ask again): the key stays free, so the client tries again with it
        await _forget(pool, principal, key)
    else:
        kept = {k: v for k, v in response.headers.items() if k.lower() in (
            "content-type", "location", "etag", "x-langorch-command-id", "x-langorch-position")}
        await pool.execute(
            """UPDATE api_commands SET state = 'done', response_status = $3, response_body = $4,
                 response_headers = $5::jsonb WHERE principal = $1 AND idempotency_key = $2""",
            principal, key, response.status_code, _withheld(request, body), json.dumps(kept))
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers)


def _withheld(request: Request, body: bytes) -> bytes:
    """The body kept for replays: the members a route named in ``request.state.idempotency_withhold`` (a value
    shown only once, such as a new API key) are kept as null."""
    names = getattr(request.state, "idempotency_withhold", ())
    if not names:
        return body
    try:
        parsed = json.loads(body)
    except ValueError:
        return b""
    if isinstance(parsed, dict):
        parsed.update(dict.fromkeys(names))
    return json.dumps(parsed, separators=(",", ":")).encode()


async def _forget(pool: asyncpg.Pool, principal: str, key: str) -> None:
    await pool.execute("DELETE FROM api_commands WHERE principal = $1 AND idempotency_key = $2 AND state = 'in_flight'",
                       principal, key)


async def purge_expired(pool: asyncpg.Pool) -> None:
    """Drop snapshots older than the replay window."""
    await pool.execute("DELETE FROM api_commands WHERE submitted_at < $1", datetime.now(UTC) - KEEP)
