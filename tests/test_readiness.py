"""api.md §3: GET /api/ready reports NATS, the four streams, PostgreSQL and projection lag; 503 when not ready."""

from __future__ import annotations

import nats
import pytest

from ckp_core.events import EVENT_TYPES
from langorch_gateway.metrics import PROJECTIONS
from tests.helpers import platform_of

pytestmark = pytest.mark.integration


async def test_ready_then_not_ready_without_a_stream(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, agents=False,
                           gateway_settings={"ready_max_lag": 0}) as p:
        await p.app.state.projector.catch_up()
        r = await p.client.get("/api/ready")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ready", "auth": "disabled",
                            "checks": {"nats": "ok", "streams": "ok", "postgres": "ok", "projections": "ok"},
                            "projection_lag": dict.fromkeys(PROJECTIONS, 0) | {"audit_log": 0}}
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream("LO_AUDIT")
        finally:
            await nc.close()
        r = await p.client.get("/api/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["streams"] == "missing LO_AUDIT"
        assert r.headers["Retry-After"] == "1"
        assert (await p.client.get("/api/health")).status_code == 200  # liveness is unaffected


async def test_event_schemas_cover_every_event_type(nats_url: str, database_url: str) -> None:
    """api.md §3 / §16: GET /api/schemas/events — the envelope and each payload type with its schema version."""
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False) as p:
        r = await p.client.get("/api/schemas/events")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"envelope", "types"}
    assert {"event_id", "type", "aggregate", "aggregate_id", "seq", "data"} <= set(body["envelope"]["properties"])
    assert set(body["types"]) == set(EVENT_TYPES)
    for name, entry in body["types"].items():
        assert set(entry) == {"schema_version", "schema"}, name
        assert isinstance(entry["schema_version"], int), name
        assert entry["schema_version"] >= 1, name
        assert entry["schema"]["type"] == "object", name
    started = body["types"]["step_started"]["schema"]
    assert {"node_id", "step_id", "binding_kind", "idempotency_key"} <= set(started["required"])
