"""Problem details (RFC 9457, api.md §1.2): one exception type and the one place codes become statuses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ckp_core.errors import CommandRefused

log = logging.getLogger(__name__)

STATUS = {
    "malformed_json": 400, "callback_mismatch": 400,
    "not_found": 404, "method_not_allowed": 405,
    "procedure_version_exists": 409, "procedure_not_runnable": 409, "procedure_not_effective": 409,
    "no_runnable_version": 409, "invalid_run_transition": 409, "procedure_version_unavailable": 409,
    "version_not_draft": 409, "invalid_status_transition": 409, "invalid_promotion": 409, "invalid_rollback": 409,
    "procedure_version_active": 409, "procedure_version_in_use": 409, "agent_exists": 409,
    "resource_limit_conflict": 409, "project_exists": 409, "project_not_empty": 409,
    "unauthenticated": 401, "invalid_token": 401, "forbidden": 403, "precondition_failed": 412,
    "promotion_validation_failed": 422, "idempotency_key_in_progress": 409, "idempotency_key_reused": 422,
    "url_not_allowed": 422, "upstream_error": 502, "upstream_timeout": 504,
    "payload_too_large": 413, "unsupported_media_type": 415,
    "validation_failed": 422, "unknown_field": 422, "unsupported_field": 422, "compile_failed": 422,
    "invalid_input_vars": 422,
    "internal_error": 500, "unavailable": 503, "too_many_streams": 429,
    "approval_not_pending": 409, "approval_expired": 409, "invalid_decision": 422, "decided_by_mismatch": 422,
    # the rest of api.md §1.2's table, so a code raised or rejected anywhere gets its status from this one place
    "token_expired": 401, "invalid_credentials": 401, "invalid_signature": 401, "stale_signature": 401,
    "csrf_failed": 403, "invalid_callback_token": 403, "callback_token_expired": 403,
    "invalid_grant": 401,  # §15.3's endpoint table (401 "bad or expired"); §1.2's table lists it under 403
    "run_not_paused": 409, "duplicate_delivery": 409, "secret_exists": 409, "secret_in_use": 409,
    "user_exists": 409, "last_admin": 409, "artifact_external": 409, "range_not_satisfiable": 416,
    "secret_value_not_accepted": 422, "unsupported_event_source": 422,
    "rate_limited": 429, "too_many_login_attempts": 429, "max_concurrent_runs": 429,
}
TITLES = {
    "malformed_json": "Malformed JSON", "not_found": "Not found", "method_not_allowed": "Method not allowed",
    "procedure_version_exists": "Procedure version exists", "procedure_not_runnable": "Procedure not runnable",
    "procedure_not_effective": "Procedure not effective yet", "no_runnable_version": "No runnable version",
    "procedure_version_unavailable": "Procedure version unavailable",
    "payload_too_large": "Payload too large", "unsupported_media_type": "Unsupported media type",
    "validation_failed": "Validation failed", "unknown_field": "Unknown field",
    "unsupported_field": "Unsupported field", "compile_failed": "Compile failed",
    "invalid_input_vars": "Invalid input variables", "internal_error": "Internal error",
    "unavailable": "Service unavailable", "version_not_draft": "Version is not a draft",
    "invalid_status_transition": "Invalid status transition", "invalid_promotion": "Invalid promotion",
    "invalid_rollback": "Invalid rollback", "procedure_version_active": "Procedure version is active",
    "procedure_version_in_use": "Procedure version in use", "agent_exists": "Agent exists",
    "resource_limit_conflict": "Resource limit conflict", "project_exists": "Project exists",
    "project_not_empty": "Project not empty", "unauthenticated": "Unauthenticated", "invalid_token": "Invalid token",
    "forbidden": "Forbidden", "precondition_failed": "Precondition failed",
    "promotion_validation_failed": "Promotion validation failed", "url_not_allowed": "URL not allowed",
    "upstream_error": "Upstream error", "upstream_timeout": "Upstream timeout",
    "idempotency_key_in_progress": "Idempotency key in progress", "idempotency_key_reused": "Idempotency key reused",
    "approval_not_pending": "Approval not pending", "approval_expired": "Approval expired",
    "invalid_decision": "Invalid decision", "decided_by_mismatch": "decided_by does not match the principal",
    "too_many_streams": "Too many streams", "callback_mismatch": "Callback mismatch",
    "invalid_run_transition": "Invalid run transition",
    "token_expired": "Token expired", "invalid_credentials": "Invalid credentials",
    "invalid_signature": "Invalid signature", "stale_signature": "Stale signature", "csrf_failed": "CSRF check failed",
    "invalid_callback_token": "Invalid callback token", "callback_token_expired": "Callback token expired",
    "invalid_grant": "Invalid grant", "run_not_paused": "Run not paused", "duplicate_delivery": "Duplicate delivery",
    "secret_exists": "Secret exists", "secret_in_use": "Secret in use", "user_exists": "User exists",
    "last_admin": "Last admin", "artifact_external": "Artifact is external",
    "range_not_satisfiable": "Range not satisfiable", "secret_value_not_accepted": "Secret value not accepted",
    "unsupported_event_source": "Unsupported event source", "rate_limited": "Rate limited",
    "too_many_login_attempts": "Too many login attempts", "max_concurrent_runs": "Too many concurrent runs",
}
RETRYABLE = frozenset({"unavailable", "idempotency_key_in_progress", "too_many_streams", "rate_limited",
                       "too_many_login_attempts", "max_concurrent_runs"})  # 503, 429 and the in-flight key (§1.2)


class ApiProblem(Exception):
    """Raise to answer with a problem response; ``extra`` becomes extension members, ``headers`` response
    headers (over the defaults, e.g. a computed ``Retry-After``)."""

    def __init__(self, code: str, detail: str, *, errors: dict[str, list[str]] | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.errors = errors
        self.status = status or STATUS.get(code, 400)
        self.headers = headers or {}
        self.extra = extra


def refused_problem(refusal: CommandRefused) -> ApiProblem:
    """The problem of a refusal by a pure ``ckp-core`` guard: its code, detail and extension members."""
    return ApiProblem(refusal.code, refusal.message, **refusal.extra)


def problem_response(request: Request, code: str, detail: str, *, status: int | None = None,
                     errors: dict[str, list[str]] | None = None, headers: dict[str, str] | None = None,
                     **extra: Any) -> JSONResponse:
    status = status or STATUS.get(code, 400)
    request_id = getattr(request.state, "request_id", None)
    body: dict[str, Any] = {
        "type": f"urn:langorch:problem:{code}", "title": TITLES.get(code, code.replace("_", " ").capitalize()),
        "status": status, "detail": detail, "instance": request.url.path, "code": code,
        "request_id": request_id, "retryable": code in RETRYABLE,
    }
    if errors is not None or status == 422:
        body["errors"] = errors or {}
    body.update(extra)
    answer_headers = {"Retry-After": "1"} if code in RETRYABLE else {}
    if status == 401:
        answer_headers["WWW-Authenticate"] = "Bearer"
    answer_headers.update(headers or {})
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=answer_headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    where, *rest = loc if loc else ("body",)
    dotted = ".".join(str(p) for p in rest)
    if where == "body":
        return dotted or "body"
    if where == "query":
        return f"query.{dotted}"
    if where == "header":
        return f"header.{dotted}"
    return f"{where}.{dotted}" if dotted else str(where)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(ApiProblem)
    async def _problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(request, exc.code, exc.detail, status=exc.status, errors=exc.errors,
                                headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: dict[str, list[str]] = {}
        kinds = set()
        for err in exc.errors():
            kinds.add(err.get("type"))
            if err.get("type") == "json_invalid":
                return problem_response(request, "malformed_json", "request body is not valid JSON")
            loc = tuple(err.get("loc", ()))
            if err.get("type") == "extra_forbidden":
                message = "Unknown field"
            elif err.get("type") == "missing":
                message = "This field is required"
            else:
                message = str(err.get("msg", "invalid"))
            errors.setdefault(_field_path(loc), []).append(message)
        code = "unknown_field" if kinds == {"extra_forbidden"} else "validation_failed"
        n = len(errors)
        return problem_response(request, code, f"{n} field{'s' if n != 1 else ''} failed validation",
                                errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type"}.get(exc.status_code, "validation_failed")
        if exc.status_code == 404:
            return problem_response(request, code, str(exc.detail), status=404, resource="route")
        return problem_response(request, code, str(exc.detail), status=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return internal_problem(request, exc)


def internal_problem(request: Request, exc: Exception) -> JSONResponse:
    """The problem of an unexpected exception: ``unavailable`` when NATS or PostgreSQL is unreachable, else
    ``internal_error`` (logged with its traceback)."""
    from asyncpg import PostgresConnectionError
    from nats.errors import (
        ConnectionClosedError,
        ConnectionReconnectingError,
        NoRespondersError,
        OutboundBufferLimitError,
    )
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

    # OutboundBufferLimitError: a publish while the gateway's NATS connection is down (it keeps no reconnect buffer);
    # NoStreamResponseError, ServiceUnavailableError: a stream of a NATS cluster without a leader for a moment (its
    # node was lost, the others are electing one)
    if isinstance(exc, PostgresConnectionError | ConnectionClosedError | ConnectionReconnectingError
                  | OutboundBufferLimitError | NoRespondersError | NatsTimeout | OSError | NoStreamResponseError
                  | ServiceUnavailableError):
        log.warning("dependency unavailable: %r", exc)
        return problem_response(request, "unavailable", "NATS or PostgreSQL is unreachable; retry later")
    log.error("internal error on %s", request.url.path, exc_info=exc)
    return problem_response(request, "internal_error", "an internal error occurred; quote the request_id")
