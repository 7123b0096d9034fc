"""``GET /metrics`` (and its alias ``/api/metrics``) and ``GET /api/metrics/summary`` (api.md §13)."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from langorch_gateway import auth, deps
from langorch_gateway.deps import clients
from langorch_gateway.metrics import CONTENT_TYPE, summary
from langorch_gateway.problems import ApiProblem
from langorch_gateway.routes_agents import read_leases
from langorch_gateway.routes_health import audit_lag

router = APIRouter()


async def _exposition(request: Request) -> Response:
    state = clients(request)
    settings = state.settings
    if settings.metrics_token is not None:
        expected = f"Bearer {settings.metrics_token.get_secret_value()}"
        if not hmac.compare_digest(request.headers.get("authorization", ""), expected):
            raise ApiProblem("unauthenticated", "GET /metrics needs the metrics bearer token")
    metrics = state.metrics
    await metrics.refresh(state.pool, state.js, state.projector.position, await audit_lag(state))
    return Response(metrics.render(), media_type=CONTENT_TYPE)


@router.get("/metrics", include_in_schema=False)
async def prometheus(request: Request) -> Response:
    """Prometheus text exposition of the gateway's registry."""
    return await _exposition(request)


@router.get("/api/metrics", deprecated=True)
async def prometheus_alias(request: Request) -> Response:
    """Accepted alias of ``GET /metrics`` (api.md §1.8)."""
    return await _exposition(request)


@router.get("/api/metrics/summary")
async def metrics_summary(principal: auth.Viewer,
                          request: Request, db: deps.Pool, js: deps.JetStream, projector: deps.Projector,
                          window_hours: Annotated[int, Query(ge=1, le=720)] = 24) -> dict[str, Any]:
    """Cluster-wide figures over the last ``window_hours``, computed from the projections."""
    leases = [lease.lease_out() for lease in await read_leases(request)]  # asked of the runtime
    return await summary(db, js, projector.position, window_hours, leases)
