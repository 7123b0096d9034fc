"""api.md §1.5: with no outcome in time the gateway answers 202 pending; the command stays durable in LO_CMD
and is processed once when the owning service is back."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agents import AgentService
from tests.conftest import platform_of

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

        service = AgentService(RuntimeSettings(nats_url=nats_url, database_url=database_url))
        await service.start()
        task = asyncio.create_task(service.run())
        try:
            for _ in range(200):
                if (await c.get("/api/agents/later")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            agent = (await c.get("/api/agents/later")).json()
            assert (agent["agent_id"], agent["status"]) == ("later", "online")
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await service.stop()
