"""``GET /api/ready`` (api.md §3): NATS connected, the four streams present, PostgreSQL answering, and every
projection within ``ready_max_lag`` events of the stream head and not stalled behind it (its consumer lost and being
created again, or its database writes blocked or failing for ``ready_stall_s``). 503 (same document) when any check
fails."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from nats.js.errors import NotFoundError

from ckp_core.subjects import AUDIT_STREAM, COMMAND_STREAM, EVENT_STREAM, EXTERNAL_STREAM
from langorch_gateway.deps import Clients, clients
from langorch_gateway.metrics import PROJECTIONS
from langorch_infra.jetstream import stream_last_position

router = APIRouter()

STREAMS = (EVENT_STREAM, COMMAND_STREAM, EXTERNAL_STREAM, AUDIT_STREAM)


@router.get("/api/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness for traffic; each check is ``"ok"`` or a short reason."""
    state = clients(request)
    settings = state.settings
    checks: dict[str, str] = {}
    lag: dict[str, int] = {}
    checks["nats"] = "ok" if state.nc.is_connected else "disconnected"
    missing: list[str] = []
    head: int | None = None
    try:
        for name in STREAMS:
            try:
                await asyncio.wait_for(state.js.stream_info(name), 2)
            except NotFoundError:
                missing.append(name)
        head = await asyncio.wait_for(stream_last_position(state.js), 2)
        checks["streams"] = "ok" if not missing else "missing " + ", ".join(missing)
    except Exception as exc:  # any NATS failure means not ready, never a 500
        checks["streams"] = f"unavailable: {type(exc).__name__}"
    try:
        await asyncio.wait_for(state.pool.fetchval("SELECT 1"), 2)
        checks["postgres"] = "ok"
    except Exception as exc:  # any PostgreSQL failure means not ready, never a 500
        checks["postgres"] = f"unavailable: {type(exc).__name__}"
    audit_behind = await audit_lag(state)
    if head is None or audit_behind is None:
        checks["projections"] = "unknown: stream head unavailable"
    else:
        behind = max(0, head - state.projector.position)
        lag = dict.fromkeys(PROJECTIONS, behind)  # the tables share the projector's one position
        lag["audit_log"] = audit_behind  # its own stream (LO_AUDIT) and position
        worst = max(behind, audit_behind)
        now = time.monotonic()
        stalled = [p.NAME for p, lagging in ((state.projector, behind), (state.audit_projector, audit_behind))
                   if lagging and p.not_moving(now, settings.ready_stall_s)]
        if stalled:  # behind and not moving (its consumer lost, its writes blocked or failing): not ready at any lag
            checks["projections"] = f"{', '.join(stalled)} behind and not moving ({worst} events behind)"
        else:
            checks["projections"] = "ok" if worst <= settings.ready_max_lag else f"{worst} events behind"
    ok = all(v == "ok" for v in checks.values())
    body: dict[str, Any] = {"status": "ready" if ok else "not_ready",
                            "auth": "enabled" if settings.auth_enabled else "disabled", "checks": checks,
                            "projection_lag": lag}
    return JSONResponse(body, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})


async def audit_lag(state: Clients) -> int | None:
    """Records of ``LO_AUDIT`` not yet in ``audit_log`` (None when the stream head is unavailable)."""
    try:
        head = await asyncio.wait_for(state.audit_projector.head(), 2)
    except Exception:  # any NATS failure means not ready, never a 500
        return None
    return max(0, int(head) - int(state.audit_projector.position))
