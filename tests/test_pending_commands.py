"""api.md §1.5: with no outcome in time the gateway answers 202 pending; the command stays durable in LO_CMD
and is processed once when the owning service is back; GET /api/commands/{id} (§3) follows it from pending to
accepted or rejected."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agents import AgentService
from tests.helpers import platform_of, wait_until

pytestmark = pytest.mark.integration


async def test_register_without_a_runtime_is_pending_then_applied(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, agents=False,
                           gateway_settings={"command_timeout_s": 0.3}) as p:
        c = p.client
        r = await c.post("/api/agents", json={"agent_id": "later", "name": "Later", "channel": "web",
                                              "base_url": "http://127.0.0.1:9", "capabilities": ["a"]})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body == {"command_id": body["command_id"], "command_type": "register_agent", "status": "pending",
                        "location": f"/api/commands/{body['command_id']}"}
        assert r.headers["Location"] == body["location"]
        assert (await c.get("/api/agents/later")).status_code == 404
        command = (await c.get(body["location"])).json()
        assert command == {"command_id": body["command_id"], "command_type": "register_agent", "actor": "anonymous",
                           "submitted_at": command["submitted_at"], "status": "pending", "position": None,
                           "resource": "/api/agents/later", "problem": None}
        # a second registration of the same id also passes the gateway's check: the runtime will refuse it
        dup = await c.post("/api/agents", json={"agent_id": "later", "name": "Later", "channel": "web",
                                                "base_url": "http://127.0.0.1:9", "capabilities": ["a"]})
        assert dup.status_code == 202

        service = AgentService(RuntimeSettings(nats_url=nats_url, database_url=database_url))
        await service.start()
        task = asyncio.create_task(service.run())
        try:
            found = await wait_until(lambda: c.get("/api/agents/later"), lambda r: r.status_code == 200, timeout=10)
            agent = found.json()
            assert (agent["agent_id"], agent["status"]) == ("later", "online")
            accepted = (await c.get(body["location"])).json()
            assert accepted["status"] == "accepted"
            assert isinstance(accepted["position"], int)
            for _ in range(100):
                rejected = (await c.get(dup.json()["location"])).json()
                if rejected["status"] != "pending":
                    break
                await asyncio.sleep(0.05)
            assert rejected["status"] == "rejected"
            assert rejected["problem"]["code"] == "agent_exists"
            assert rejected["problem"]["status"] == 409
            missing = await c.get("/api/commands/01a2ffff-0000-7000-8000-000000000000")
            assert (missing.status_code, missing.json()["code"]) == (404, "not_found")
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await service.stop()
