"""The gateway: FastAPI REST + SSE over the projections, publishing commands to JetStream.

``create_app(settings)`` is the composition root: it opens NATS and PostgreSQL once in the lifespan, starts
the projector, and keeps the clients on ``app.state``, from where :mod:`langorch_gateway.deps` hands them to the
routes as typed dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.datastructures import MutableHeaders
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ckp_core import runs
from ckp_core.commands import CreateRun
from ckp_core.errors import InvalidInputVars
from ckp_core.events import event_json_schemas, format_time
from ckp_core.ids import new_id
from ckp_core.subjects import aggregate_filter
from ckp_core.variables import VariableSpec, validate_inputs
from langorch_gateway import (
    auditing,
    auth,
    deps,
    dispatch,
    idempotency,
    queries,
    routes_agents,
    routes_analysis,
    routes_api_docs,
    routes_approvals,
    routes_audit,
    routes_auth,
    routes_callbacks,
    routes_commands,
    routes_config,
    routes_health,
    routes_metrics,
    routes_procedures,
    routes_projects,
    routes_run_control,
    routes_run_graph,
    routes_runs_more,
    routes_secrets,
    routes_triggers,
    routes_users,
    routes_webhooks,
    run_creation,
    ui,
    users,
    views,
)
from langorch_gateway.admission import Admission
from langorch_gateway.credentials import GatewayAuthenticator
from langorch_gateway.metrics import GatewayMetrics
from langorch_gateway.pool import open_pool
from langorch_gateway.problems import ApiProblem, install, internal_problem, problem_response
from langorch_gateway.projector import AuditProjector, Projector, ensure_schema
from langorch_gateway.streams import StreamSlots, until_stopping
from langorch_gateway.text_safety import check_request
from langorch_infra import tracing
from langorch_infra.hosting import Drain
from langorch_infra.jetstream import (
    JetStreamEventStore,
    connect,
    ensure_topology,
    follow,
)
from langorch_infra.presence import Presence, new_instance_id
from langorch_infra.secret_providers import EventStoreRecords, SecretResolver
from langorch_infra.settings import GatewaySettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("langorch_gateway.access")  # one JSON line per request (api.md §1.3)

API_VERSION = "1"
POOL_CLOSE_S = 10.0  # shutdown: wait this long for pooled PostgreSQL connections to be released
SERVICE_VERSION = "0.1.0"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LARGE_BODY_PATHS = ("/api/procedures", "/ui/procedures")  # the console's import form carries a CKP document too
CONSOLE_PATH = "/ui/"  # the console's forms post form data; its handlers send them on to the API as JSON
CALLBACK_PATH = re.compile(r"^/api/runs/[^/]+/callback$")  # agent callbacks carry step outputs up to 10 MiB too
WEBHOOK_PATH = re.compile(r"^/api/triggers/webhook/[^/]+$")  # raw bodies of any type: routes_webhooks checks them
TRIGGER_TYPES = ("api", "manual", "scheduled", "webhook", "event", "file_watch", "subflow")
NO_FASTAPI_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
"""FastAPI's own OpenTelemetry instrumentation is off: it turns itself on whenever a tracer provider is installed
(tracing.py installs the SDK's in every process), and then made a server span of its own besides the gateway's
(``tracing.server_span``) and a span for the dependencies, the endpoint and the serialisation of every request —
also when nothing is exported, which the gateway's own spans avoid (``tracing.span``)."""
Limit = queries.Limit
Offset = Annotated[int, Query(ge=0, le=queries.MAX_BIGINT)]
AfterQuery = Annotated[int | None, Query(ge=0, le=queries.MAX_BIGINT)]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    procedure_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    procedure_version: str | None = None
    release_channel: str | None = Field(None, pattern=r"^(dev|qa|prod)$")
    input_vars: dict[str, Any] = Field(default_factory=dict)
    project_id: str | None = None
    case_id: Any = None  # reserved: a non-null value is 422 unsupported_field (api.md §5.3), not a type error


def create_app(settings: GatewaySettings, *, extra_registries: Sequence[CollectorRegistry] = ()) -> FastAPI:
    """Build the gateway application; ``extra_registries`` (the other services of ``langorch up``) are served
    with the gateway's own in ``GET /metrics`` (api.md §13.1)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        users.check_startup(settings)  # auth on with a weak key, or off on a non-loopback bind: refuse to start
        # no reconnect buffer: a command published while NATS is away fails at once (503) and is never sent later
        nc = await connect(settings.nats_url, "langorch-gateway", settings, buffer_while_reconnecting=False)
        js = nc.jetstream()
        await ensure_topology(js, audit_retention_days=settings.audit_retention_days, replicas=settings.nats_replicas)
        pool = await open_pool(settings.database_url)  # no reset round trip per release (pool.py)
        assert pool is not None
        await ensure_schema(pool)
        await idempotency.purge_expired(pool)
        projector = Projector(pool, js)
        # the auth caches forget a user or an API key as soon as the projector sees it change (a revoked key)
        projector.watch("user", authenticator.cache.changed)
        projector.watch("api_key", authenticator.keys.changed)
        app.state.audit_projector = audit_projector = AuditProjector(pool, js, settings.audit_retention_days)
        projector.bus = audit_projector.bus = app.state.metrics.bus
        projector.start()
        audit_projector.start()
        app.state.nc, app.state.js, app.state.pool, app.state.projector = nc, js, pool, projector
        projector.drain = audit_projector.drain = app.state.drain
        app.state.store = JetStreamEventStore(js)
        # secret records are folded from LO_EVT, as the runtime does: one rule for both (routes_secrets)
        app.state.secret_resolver = SecretResolver(
            settings, EventStoreRecords(app.state.store, settings.secret_cache_ttl_s))
        presence = Presence(js, "gateway", settings.instance_id or new_instance_id(), SERVICE_VERSION, settings,
                            ttl_s=settings.presence_ttl_s)
        await presence.start()
        auth_task = await users.start(deps.Clients(app.state), authenticator.users_lock)
        try:
            yield
        finally:
            auth_task.cancel()
            await presence.stop()
            await projector.stop()
            await audit_projector.stop()
            try:  # close waits for every connection to be released; a stuck one must not hold up the exit
                await asyncio.wait_for(pool.close(), POOL_CLOSE_S)
            except TimeoutError:
                log.warning("PostgreSQL pool did not close within %s s; terminating its connections", POOL_CLOSE_S)
                pool.terminate()
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await nc.close()

    # /docs and /redoc: routes_api_docs serves them from vendored assets (FastAPI's load them from a CDN)
    app = FastAPI(title="LangOrch API", version=SERVICE_VERSION, lifespan=lifespan, docs_url=None,
                  redoc_url=None, telemetry=NO_FASTAPI_TELEMETRY)
    app.state.settings = settings
    app.state.metrics = metrics = GatewayMetrics(SERVICE_VERSION, extra_registries)
    app.state.stream_slots = StreamSlots(settings.sse_max_per_principal)
    app.state.admission = Admission(settings.admission_max_backlog, settings.admission_retry_after_s,
                                    settings.admission_cache_ms / 1000, metrics)
    app.state.project_names_lock = asyncio.Lock()  # deps.NamesLock
    app.state.drain = Drain()  # begun by the server when it stops (langorch_infra.hosting.ManagedServer)
    app.state.authenticator = authenticator = GatewayAuthenticator(settings)
    metrics.auth_disabled.set(0 if settings.auth_enabled else 1)
    install(app)

    class Envelope:
        """Every HTTP request's envelope: its request id and server span, the common headers of the answer, the
        request metrics and the access log (taken when the answer starts), and an unexpected exception answered as a
        problem. Plain ASGI: starlette's ``BaseHTTPMiddleware`` (``app.middleware("http")``) cost about 0.16 ms of
        CPU per request (a task group and memory streams per call), a sixth of a ``GET /api/runs/{id}``. Only the
        requests :func:`respond` has more to do for (body checks, idempotency, which snapshots the answer) still go
        through one; a GET or HEAD is checked for U+0000 (``check_request``) and served directly."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app
            self.checked = BaseHTTPMiddleware(app, dispatch=respond)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            started = time.perf_counter()
            request = Request(scope, receive)
            rid = request.headers.get("x-request-id")
            request.state.request_id = rid if rid and REQUEST_ID.match(rid) else new_id()
            answered = False
            # the request span: a child of a valid incoming traceparent, else a new trace (api.md §1.3)
            with tracing.server_span(f"{request.method} {request.url.path}", request.headers) as span:
                request.state.trace_id = tracing.trace_id_of(span) or secrets.token_hex(16)

                async def enveloped(message: Message) -> None:
                    nonlocal answered
                    if message["type"] == "http.response.start" and not answered:
                        answered = True
                        status = int(message["status"])
                        headers = MutableHeaders(scope=message)
                        headers["X-Request-ID"] = request.state.request_id
                        headers["X-Trace-ID"] = request.state.trace_id
                        headers["LangOrch-API-Version"] = API_VERSION
                        headers["X-LangOrch-Auth"] = "enabled" if settings.auth_enabled else "disabled"
                        observed(request, span, status, time.perf_counter() - started)
                    await send(message)

                try:
                    if request.method in ("GET", "HEAD") and not WEBHOOK_PATH.match(request.url.path):
                        try:
                            await check_request(request)
                        except ApiProblem as refused:
                            await problem_response(request, refused.code, refused.detail, errors=refused.errors)(
                                scope, receive, enveloped)
                            return
                        await self.app(scope, receive, enveloped)
                    else:
                        await self.checked(scope, receive, enveloped)
                except Exception as exc:  # answered here so that it carries the headers and is logged once
                    if answered:
                        raise
                    await internal_problem(request, exc)(scope, receive, enveloped)

    def observed(request: Request, span: Any, status: int, elapsed: float) -> None:
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "<unmatched>"
        span.update_name(f"{request.method} {template}")
        span.set_attribute("http.route", template)
        span.set_attribute("http.response.status_code", status)
        metrics.http_requests.labels(method=request.method, route=template, status=str(status)).inc()
        metrics.http_duration.labels(method=request.method, route=template).observe(elapsed)
        access_log.info("%s %s %s", request.method, request.url.path, status, extra={
            "request_id": request.state.request_id, "trace_id": request.state.trace_id,
            "actor": auth.actor(request).render(), "method": request.method, "route": template,
            "path": request.url.path, "status": status, "duration_ms": round(elapsed * 1000, 3)})

    app.add_middleware(Envelope)

    async def respond(request: Request, call_next: Any) -> Response:
        problem: ApiProblem | None = None
        if WEBHOOK_PATH.match(request.url.path):  # streamed to the route unread (it caps and verifies the bytes)
            return await call_next(request)  # type: ignore[no-any-return]
        if request.method in ("POST", "PUT", "PATCH"):
            ctype = request.headers.get("content-type", "")
            raw_length = request.headers.get("content-length")
            # without Content-Length (chunked) the body is read here, so its type and size are checked the same way
            length = int(raw_length) if raw_length and raw_length.isascii() and raw_length.isdigit() else len(
                await request.body())
            large = request.url.path.startswith(LARGE_BODY_PATHS) or CALLBACK_PATH.match(request.url.path)
            limit = 10 * 1024 * 1024 if large else 1024 * 1024
            form_post = request.url.path.startswith(CONSOLE_PATH)
            if length and not form_post and not ctype.split(";")[0].strip().endswith("json"):
                problem = ApiProblem("unsupported_media_type", f"content type '{ctype}' is not accepted; "
                                     "send application/json")
            elif length > limit:
                problem = ApiProblem("payload_too_large", f"body of {length} bytes exceeds {limit} bytes")
        if problem is None:
            try:
                await check_request(request)
            except ApiProblem as refused:
                problem = refused
        if problem is not None:
            return problem_response(request, problem.code, problem.detail, errors=problem.errors)
        if idempotency.applies(request) and "idempotency-key" in request.headers:
            try:
                return await idempotency.handle(request, call_next)
            except ApiProblem as refused:
                return problem_response(request, refused.code, refused.detail, errors=refused.errors,
                                        **refused.extra)
        return await call_next(request)  # type: ignore[no-any-return]

    # -- meta ---------------------------------------------------------------------------------------
    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok", "service": "gateway", "version": SERVICE_VERSION,
                "auth": "enabled" if settings.auth_enabled else "disabled"}

    @app.get("/api/schemas/events")
    async def schemas(principal: auth.Viewer) -> dict[str, Any]:
        """JSON Schemas of the event envelope and payloads, generated from ckp-core."""
        return event_json_schemas()

    # -- procedures --------------------------------------------------------------------------------
    # Routes whose second path segment is a literal (POST /api/procedures/validate, GET /api/procedures/{id}/diff)
    # must be registered ABOVE this line: the router's /api/procedures/{procedure_id}/{version} would swallow them.
    app.include_router(routes_runs_more.router)  # before the {run_id} routes: owns /api/runs/cleanup
    app.include_router(routes_analysis.router)
    app.include_router(routes_run_graph.router)
    app.include_router(routes_callbacks.router)
    app.include_router(routes_run_control.router)
    app.include_router(routes_procedures.router)
    app.include_router(routes_projects.router)
    app.include_router(routes_secrets.router)
    app.include_router(routes_agents.router)
    app.include_router(routes_approvals.router)
    app.include_router(routes_webhooks.router)  # before routes_triggers' /api/triggers/{procedure_id}/{version}
    app.include_router(routes_triggers.router)
    app.include_router(routes_metrics.router)
    app.include_router(routes_commands.router)
    app.include_router(routes_config.router)
    app.include_router(routes_health.router)
    app.include_router(routes_api_docs.router)
    app.include_router(routes_audit.router)
    app.include_router(routes_auth.router)
    app.include_router(routes_users.router)
    app.include_router(ui.router)  # the console under /ui, and / opening it

    # -- runs ---------------------------------------------------------------------------------------
    @app.post("/api/runs", status_code=201)
    async def create_run(principal: auth.Operator, request: Request, db: deps.Pool, body: RunCreate) -> JSONResponse:
        """Check the version and the inputs, then submit ``lo.cmd.run.create`` to the runtime (the run's single
        writer) and wait for its outcome: ``run_created`` (201, the run once projected) or ``command_rejected``
        (the problem it names); 202 pending when the runtime did not decide in time."""
        if body.case_id is not None:
            raise ApiProblem("unsupported_field", "case_id is reserved for a later version; send null or omit it",
                             errors={"case_id": ["Not supported: must be null"]})
        if body.release_channel is not None and body.procedure_version is not None:
            raise ApiProblem("validation_failed", "release_channel chooses a version only when procedure_version is "
                             "omitted; send one of them", errors={"release_channel": [
                                 "Only allowed when procedure_version is omitted"]})
        run_id = new_id()
        # refusals on the procedure's state (409) or on the inputs (422) are decided outcomes: audited
        async with auditing.refusals_audited(request, "run", "start", resource_type="run", resource_id=None,
                                             meta={"procedure_id": body.procedure_id,
                                                   "procedure_version": body.procedure_version,
                                                   "release_channel": body.release_channel},
                                             statuses=(409, 422)):
            row = await _resolve_version(db, body, settings.default_run_channel)
            if body.project_id is not None and await db.fetchval(
                    "SELECT 1 FROM projects WHERE project_id = $1", body.project_id) is None:
                raise ApiProblem("not_found", f"project {body.project_id} not found", resource="project")
            eff = row["effective_date"]
            if eff and date.fromisoformat(eff) > datetime.now(UTC).date():
                raise ApiProblem("procedure_not_effective", f"version {row['version']} is effective from {eff}")
            schema = views._json(row["variables_schema"]) or {}
            variables = {n: VariableSpec.model_validate(s | {"has_default": s.get("default") is not None})
                         for n, s in schema.items()}
            builtins = {"run_id": run_id, "root_run_id": run_id, "parent_run_id": None,
                        "procedure_id": row["procedure_id"], "procedure_version": row["version"],
                        "trigger_type": "api", "triggered_by": None, "now": format_time(datetime.now(UTC)),
                        "today": datetime.now(UTC).date().isoformat()}
            try:  # a pre-check for precise 422s: the runtime validates the inputs again when it decides
                validate_inputs(variables, body.input_vars, builtins)
            except InvalidInputVars as exc:
                raise ApiProblem("invalid_input_vars", exc.message, errors=exc.errors) from exc
        command = CreateRun(actor=principal.actor, causation_id=request.state.request_id, run_id=run_id,
                            procedure_id=row["procedure_id"], procedure_version=row["version"],
                            release_channel=row["release_channel"] if body.procedure_version is None else None,
                            input_vars=body.input_vars, trigger_type="api", root_run_id=run_id,
                            project_id=body.project_id or row["project_id"])
        return await run_creation.submit(request, command)

    @app.get("/api/runs")
    async def list_runs(
        principal: auth.Viewer,
        request: Request,
        db: deps.Pool,
        procedure_id: str | None = None,
        procedure_version: str | None = None,
        status: str | None = None,
        limit: Limit = 100,
        offset: Offset = 0,
        project_id: str | None = None,
        trigger_type: str | None = None,
        created_by: str | None = None,
        parent_run_id: str | None = None,
        top_level: bool | None = None,
        rerun_of: str | None = None,
        created_from: str | None = None,
        created_to: str | None = None,
        sort: Annotated[Literal["created_at", "updated_at", "ended_at", "duration_seconds"],
                        Query()] = "created_at",
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    ) -> JSONResponse:
        """Page of runs (api.md §5.3 filters), newest first by default."""
        headers = await dispatch.min_position(request)
        statuses, trigger_types, since, until = queries.gather(
            lambda: queries.comma_list("status", status, runs.STATUSES, {"cancelled": "canceled"}),
            lambda: queries.comma_list("trigger_type", trigger_type, TRIGGER_TYPES),
            lambda: routes_runs_more.parse_query_time("created_from", created_from),
            lambda: routes_runs_more.parse_query_time("created_to", created_to))
        where = queries.Where()
        where.eq("procedure_id", procedure_id)
        where.eq("procedure_version", procedure_version)
        where.eq("status", statuses)
        where.eq("trigger_type", trigger_types)
        where.eq("project_id", project_id)
        where.eq("created_by", created_by)
        where.eq("parent_run_id", parent_run_id)
        where.eq("rerun_of", rerun_of)
        if top_level is not None:
            where.add("parent_run_id IS NULL" if top_level else "parent_run_id IS NOT NULL")
        if since is not None:
            where.add(f"created_at >= {where.arg(since)}")
        if until is not None:
            where.add(f"created_at < {where.arg(until)}")
        key = "(COALESCE(ended_at, now()) - started_at)" if sort == "duration_seconds" else sort
        rows, total = await queries.fetch_page(db, "runs", where,
                                               f"{key} {order.upper()} NULLS LAST, run_id {order.upper()}", limit,
                                               offset)
        return JSONResponse(views.page([views.run_out(r) for r in rows], total, limit, offset), headers=headers)

    @app.get("/api/runs/{run_id}")
    async def get_run(principal: auth.Viewer, request: Request, db: deps.Pool, run_id: str) -> JSONResponse:
        """One run."""
        headers = await dispatch.min_position(request)
        row = await db.fetchrow("SELECT * FROM runs WHERE run_id = $1", run_id)
        if row is None:
            raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
        return JSONResponse(views.run_out(row), headers=headers)

    @app.get("/api/runs/{run_id}/events")
    async def run_events(
        principal: auth.Viewer,
        request: Request,
        db: deps.Pool,
        run_id: str,
        event_type: str | None = None,
        node_id: str | None = None,
        step_id: str | None = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> JSONResponse:
        """Page of a run's events in ``seq`` order."""
        headers = await dispatch.min_position(request)
        if await db.fetchval("SELECT 1 FROM runs WHERE run_id = $1", run_id) is None:
            raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
        types = queries.comma_list("event_type", event_type)
        where, args = _filters({"run_id": run_id, "event_type": types, "node_id": node_id,
                                "step_id": step_id})
        rows, total = await _page(db, "run_events", where, args, "seq", limit, offset)
        return JSONResponse(views.page([views.event_out_from_row(r) for r in rows], total, limit, offset),
                            headers=headers)

    @app.get("/api/runs/{run_id}/stream")
    async def run_stream(
        request: Request,
        principal: auth.Viewer,
        db: deps.Pool,
        js: deps.JetStream,
        store: deps.EventStore,
        slots: deps.Slots,
        run_id: str,
        after: AfterQuery = None,
        history: bool = True,
        last_event_id: LastEventId = None,
    ) -> EventSourceResponse:
        """Live SSE of a run's events straight from JetStream, resumable with ``Last-Event-ID``."""
        known = await db.fetchval("SELECT 1 FROM runs WHERE run_id = $1", run_id)
        if known is None and await store.head("run", run_id) is None:
            raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
        start = after or 0
        if last_event_id is not None:
            start = queries.header_position("Last-Event-ID", last_event_id)
        new_only = last_event_id is None and after is None and not history
        release = slots.acquire(principal.actor.render())
        drain = deps.clients(request).drain

        async def events() -> AsyncIterator[ServerSentEvent]:
            metrics.sse.labels(stream="run").inc()
            try:
                async for event in until_stopping(run_events_of(), drain):
                    yield event
            finally:
                metrics.sse.labels(stream="run").dec()
                release()

        async def run_events_of() -> AsyncGenerator[ServerSentEvent, None]:
            yield ServerSentEvent(comment="langorch run stream", retry=3000)
            async for stored in follow(js, aggregate_filter("run", run_id), start, new_only=new_only):
                env = stored.envelope
                yield ServerSentEvent(json.dumps(views.event_out(env, stored.position), separators=(",", ":")),
                                      event="run_event", id=str(stored.position))
                if env.type in runs.ENDS:
                    yield ServerSentEvent(json.dumps({"run_id": run_id, "status": runs.ENDS[env.type]}), event="end")
                    return

        return EventSourceResponse(events(), ping=settings.sse_keepalive_s, headers={"Cache-Control": "no-cache"},
                                   background=BackgroundTask(release))

    match_run_routes_first(app)
    return app


HOT_ROUTES = ("/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/events", "/api/runs/{run_id}/stream")
"""The routes clients poll most, defined above (``create_app``): :func:`match_run_routes_first` tries them first."""


def match_run_routes_first(app: FastAPI) -> None:
    """Move the :data:`HOT_ROUTES` before the included routers. A request is matched against the routes in order,
    and an included router's routes one by one: ``GET /api/runs/{run_id}`` came after about 150 of them, most of
    its CPU time on a loaded machine (bench/load.py polls it). The first route matching path and method serves the
    request, and no included router has a route matching these paths with these methods
    (tests/test_gateway_route_order.py checks it), so only where the match is found changes."""
    routes = app.router.routes
    hot = [r for r in routes if isinstance(r, APIRoute) and r.path in HOT_ROUTES]
    rest = [r for r in routes if not any(r is h for h in hot)]
    first_router = next(i for i, r in enumerate(rest) if not isinstance(r, APIRoute | Route))
    routes[:] = [*rest[:first_router], *hot, *rest[first_router:]]


def _filters(values: dict[str, Any]) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in values.items():
        if value is None or value == "":  # an empty filter is no filter (queries.Where.eq)
            continue
        args.append(value)
        clauses.append(f"{column} = ANY(${len(args)})" if isinstance(value, list) else f"{column} = ${len(args)}")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


async def _page(db: asyncpg.Pool, table: str, where: str, args: list[Any], order: str, limit: int,
                offset: int) -> tuple[list[asyncpg.Record], int]:
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        total = await conn.fetchval(f"SELECT count(*) FROM {table}{where}", *args)  # noqa: S608
        rows = await conn.fetch(
            f"SELECT * FROM {table}{where} ORDER BY {order} LIMIT {limit} OFFSET {offset}", *args)  # noqa: S608
    return list(rows), int(total)


async def _resolve_version(db: asyncpg.Pool, body: RunCreate, default_channel: str | None) -> asyncpg.Record:
    """The procedure version a new run executes (api.md §5.3 RunCreate); ``default_channel`` is
    ``LANGORCH_DEFAULT_RUN_CHANNEL``, used when the request names neither a version nor a channel."""
    pid = body.procedure_id
    if body.procedure_version not in (None, "latest"):
        row = await db.fetchrow("SELECT * FROM procedures WHERE procedure_id = $1 AND version = $2", pid,
                                body.procedure_version)
        if row is None:
            raise ApiProblem("not_found", f"procedure {pid} version {body.procedure_version} not found",
                             resource="procedure")
        if row["status"] not in ("draft", "active"):
            raise ApiProblem("procedure_not_runnable", f"version {row['version']} is {row['status']}")
        return row
    if body.procedure_version == "latest":
        row = await db.fetchrow(
            "SELECT * FROM procedures WHERE procedure_id = $1 AND status IN ('draft', 'active') "
            "ORDER BY position DESC LIMIT 1", pid)
    else:
        named = body.release_channel or default_channel
        channels = [named] if named else ["prod", "qa", "dev"]
        row = None
        for channel in channels:
            row = await db.fetchrow(
                "SELECT * FROM procedures WHERE procedure_id = $1 AND status = 'active' AND release_channel = $2",
                pid, channel)
            if row is not None:
                break
    if row is None:
        if await db.fetchval("SELECT 1 FROM procedures WHERE procedure_id = $1", pid) is None:
            raise ApiProblem("not_found", f"procedure {pid} not found", resource="procedure")
        raise ApiProblem("no_runnable_version", f"procedure {pid} has no runnable version here: name a "
                         "procedure_version (or 'latest'), or activate a version")
    return row
