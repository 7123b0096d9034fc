"""api.md §8: leases read from KV lo_leases and force-released through the runtime (revision-checked delete +
``lease_force_released``). Nothing acquires leases yet, so the test writes keys in the documented shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from nats.js.errors import KeyNotFoundError

from ckp_core.events import format_time
from ckp_core.ids import new_id
from ckp_core.subjects import LEASES_BUCKET, lease_key
from tests.agent_server import RunningAgent, running_agent
from tests.helpers import Platform, platform_of, problem

pytestmark = pytest.mark.integration

LEASE_FIELDS = {"lease_id", "resource_key", "slot", "agent_id", "pool_id", "run_id", "node_id", "step_id", "holder",
                "acquired_at", "renewed_at", "expires_at", "is_active"}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        yield p


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[RunningAgent]:
    async with running_agent() as a:
        yield a


async def put_lease(nats_url: str, resource_key: str, slot: int, *, agent_id: str, run_id: str | None = None,
                    acquired_minutes_ago: int = 1, ttl_s: int = 60) -> dict[str, Any]:
    now = datetime.now(UTC)
    value = {"lease_id": new_id(), "resource_key": resource_key, "slot": slot, "agent_id": agent_id,
             "pool_id": "lease_default", "run_id": run_id or new_id(), "node_id": "scrape", "step_id": "title",
             "holder": "runtime-test", "acquired_at": format_time(now - timedelta(minutes=acquired_minutes_ago)),
             "renewed_at": format_time(now), "expires_at": format_time(now + timedelta(seconds=ttl_s))}
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(LEASES_BUCKET)
        await kv.create(lease_key(resource_key, slot), json.dumps(value).encode())
    finally:
        await nc.close()
    return value


async def test_list_get_and_force_release(platform: Platform, agent: RunningAgent) -> None:
    c = platform.client
    r = await c.post("/api/agents", json={"agent_id": "leaser", "name": "Leaser", "channel": "lease",
                                          "base_url": agent.base_url, "concurrency_limit": 3,
                                          "resource_key": "browser.pool", "capabilities": ["a"]})
    assert r.status_code == 201, r.text
    first = await put_lease(platform.nats_url, "browser.pool", 0, agent_id="leaser", acquired_minutes_ago=5)
    second = await put_lease(platform.nats_url, "browser.pool", 1, agent_id="leaser", acquired_minutes_ago=2)
    other = await put_lease(platform.nats_url, "other-key", 0, agent_id="someone", acquired_minutes_ago=9,
                            ttl_s=-5)

    page = (await c.get("/api/leases")).json()
    assert page["total"] == 3
    assert [x["lease_id"] for x in page["items"]] == [other["lease_id"], first["lease_id"], second["lease_id"]]
    assert set(page["items"][0]) == LEASE_FIELDS
    assert [x["is_active"] for x in page["items"]] == [False, True, True]  # past expires_at
    assert (await c.get("/api/leases", params={"resource_key": "browser.pool"})).json()["total"] == 2
    assert [x["lease_id"] for x in (await c.get("/api/leases", params={"run_id": second["run_id"]})).json()[
        "items"]] == [second["lease_id"]]
    assert (await c.get("/api/leases", params={"agent_id": "leaser", "limit": 1, "offset": 1})).json()[
        "items"][0]["lease_id"] == second["lease_id"]
    assert (await c.get("/api/leases", params={"pool_id": "nope"})).json() == {"items": [], "total": 0,
                                                                                "limit": 100, "offset": 0}
    problem(await c.get("/api/leases", params={"limit": 0}), 422, "validation_failed")

    got = (await c.get(f"/api/leases/{first['lease_id']}")).json()
    assert got == first | {"is_active": True}
    assert (await c.get("/api/agents/leaser")).json()["active_leases"] == 2
    pool = (await c.get("/api/agents/pools", params={"channel": "lease"})).json()["items"][0]
    assert (pool["active_leases"], pool["available_capacity"]) == (2, 1)

    r = await c.delete(f"/api/leases/{first['lease_id']}", params={"reason": "stuck browser"})
    assert r.status_code == 204, r.text
    problem(await c.get(f"/api/leases/{first['lease_id']}"), 404, "not_found")
    nc = await nats.connect(platform.nats_url)
    try:
        js = nc.jetstream()
        kv = await js.key_value(LEASES_BUCKET)
        with pytest.raises(KeyNotFoundError):
            await kv.get(lease_key("browser.pool", 0))
        await kv.get(lease_key("browser.pool", 1))  # the other slot is untouched
        event = json.loads((await js.get_last_msg("LO_EVT", f"lo.evt.lease.{first['lease_id']}.>")).data)
    finally:
        await nc.close()
    assert event["type"] == "lease_force_released"
    assert event["actor"] == {"kind": "anonymous", "id": None}
    assert event["data"] == {"lease_id": first["lease_id"], "resource_key": "browser.pool", "slot": 0,
                             "run_id": first["run_id"], "reason": "stuck browser"}
    assert (await c.get("/api/leases")).json()["total"] == 2
    problem(await c.delete(f"/api/leases/{first['lease_id']}"), 404, "not_found")
    problem(await c.get("/api/leases/unknown"), 404, "not_found")
