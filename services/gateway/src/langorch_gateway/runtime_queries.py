"""Asking the runtime (``ckp_core.queries``): checkpoints, step records, leases and agent liveness are the
runtime's storage, so the gateway requests them over NATS instead of reading them. No runtime answering, or one
too slow, is a 503 ``unavailable`` problem naming the runtime; a refused query is answered as precisely."""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from pydantic import ValidationError

from ckp_core.queries import Query, QueryError, Reply
from langorch_gateway.problems import ApiProblem

R = TypeVar("R", bound=Reply)

QUERY_TIMEOUT_S = 10.0


def _unavailable(subject: str, why: str) -> ApiProblem:
    return ApiProblem("unavailable", f"the runtime {why} ({subject}); this part of the answer comes from the "
                      "runtime, which must be running", service="runtime", query=subject)


async def ask(request: Request, query: Query, reply_type: type[R], *, timeout_s: float | None = None) -> R:
    """Send ``query`` to the runtime's query endpoints and return its reply (one replica of the queue group
    answers) within ``timeout_s`` (default ``QUERY_TIMEOUT_S``)."""
    nc: NATS = request.app.state.nc
    subject = query.SUBJECT
    timeout_s = timeout_s or QUERY_TIMEOUT_S
    try:
        msg = await nc.request(subject, query.model_dump_json().encode(), timeout=timeout_s)
    except NoRespondersError:
        raise _unavailable(subject, "does not answer: no replica serves the query") from None
    except (NatsTimeoutError, TimeoutError):
        raise _unavailable(subject, f"did not answer within {timeout_s:g} s") from None
    code = (msg.headers or {}).get(ERROR_CODE_HEADER)
    if code is not None:
        try:
            error = QueryError.model_validate_json(msg.data)
        except ValidationError:
            error = QueryError(code="query_failed", detail=(msg.headers or {}).get(ERROR_HEADER, ""))
        if code == "413":
            raise ApiProblem("payload_too_large", f"the runtime's answer is too large: {error.detail}", status=413,
                             query=subject)
        raise _unavailable(subject, f"could not answer: {error.detail}")
    try:
        return reply_type.model_validate_json(msg.data)
    except ValidationError:
        raise _unavailable(subject, "answered something that is not a " + reply_type.__name__) from None
