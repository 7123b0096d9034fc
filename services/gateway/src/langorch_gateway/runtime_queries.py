"""Asking the runtime (``ckp_core.queries``): checkpoints, step records, leases and agent liveness are the
runtime's storage, so the gateway requests them over NATS instead of reading them. No runtime answering, or one
too slow, is a 503 ``unavailable`` problem naming the runtime; a refused query is answered as precisely."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from nats.aio.client import NO_RESPONDERS_STATUS
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import Header
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from pydantic import ValidationError

from ckp_core.queries import CHUNK_HEADER, MAX_REPLY_BYTES, Query, QueryError, Reply
from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem

R = TypeVar("R", bound=Reply)

QUERY_TIMEOUT_S = 10.0
STATUS_HEADER = Header.STATUS.value  # "Status": the server's no-responders answer carries 503


def _unavailable(subject: str, why: str) -> ApiProblem:
    return ApiProblem("unavailable", f"the runtime {why} ({subject}); this part of the answer comes from the "
                      "runtime, which must be running", service="runtime", query=subject)


async def ask(request: Request, query: Query, reply_type: type[R], *, timeout_s: float | None = None) -> R:
    """:func:`ask_runtime` on the gateway's NATS connection."""
    return await ask_runtime(clients(request).nc, query, reply_type, timeout_s=timeout_s)


async def ask_runtime(nc: NATS, query: Query, reply_type: type[R], *, timeout_s: float | None = None) -> R:
    """Send ``query`` to the runtime's query endpoints and return its reply (one replica of the queue group
    answers) within ``timeout_s`` (default ``QUERY_TIMEOUT_S``); :class:`ApiProblem` when none can be had."""
    subject = query.SUBJECT
    timeout_s = timeout_s or QUERY_TIMEOUT_S
    try:
        headers, data = await _exchange(nc, subject, query.model_dump_json().encode(), timeout_s)
    except NoRespondersError:
        raise _unavailable(subject, "does not answer: no replica serves the query") from None
    except (NatsTimeoutError, TimeoutError):
        raise _unavailable(subject, f"did not answer within {timeout_s:g} s") from None
    code = headers.get(ERROR_CODE_HEADER)
    if code is not None:
        try:
            error = QueryError.model_validate_json(data)
        except ValidationError:
            error = QueryError(code="query_failed", detail=headers.get(ERROR_HEADER, ""))
        if code == "413":
            raise ApiProblem("payload_too_large", f"the runtime's answer is too large: {error.detail}", status=413,
                             query=subject)
        raise _unavailable(subject, f"could not answer: {error.detail}")
    try:
        return reply_type.model_validate_json(data)
    except ValidationError:
        raise _unavailable(subject, "answered something that is not a " + reply_type.__name__) from None


async def _exchange(nc: NATS, subject: str, payload: bytes, timeout_s: float) -> tuple[dict[str, str], bytes]:
    """One request and its reply: the headers of its first message and the data of all of them (a reply larger
    than one NATS message comes in parts, in order, marked ``CHUNK_HEADER: i/n``)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, pending_bytes_limit=MAX_REPLY_BYTES + 1_048_576)
    try:
        await nc.publish(subject, payload, reply=inbox)
        first = await sub.next_msg(timeout=timeout_s)
        headers = dict(first.headers or {})
        if headers.get(STATUS_HEADER) == NO_RESPONDERS_STATUS:
            raise NoRespondersError
        part, _, total = headers.get(CHUNK_HEADER, "1/1").partition("/")
        if part != "1" or not total.isdigit() or not 1 <= int(total) <= MAX_REPLY_BYTES // 1024:
            raise NatsTimeoutError  # not the start of a reply this gateway can read: as if none came
        parts = [first.data]
        for _ in range(int(total) - 1):
            parts.append((await sub.next_msg(timeout=timeout_s)).data)
        return headers, b"".join(parts)
    finally:
        await sub.unsubscribe()
