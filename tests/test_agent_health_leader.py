"""api.md §7.3: exactly one runtime replica (leader key in KV lo_locks) probes agents' /health; three failures
open the circuit and take the agent offline, a success closes it; a stopped leader is replaced."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agents import AgentService
from tests.agent_server import AgentBehaviour, running_agent
from tests.helpers import eventually, platform_of

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def poller(nats_url: str, database_url: str, name: str) -> AsyncIterator[AgentService]:
    service = AgentService(RuntimeSettings(nats_url=nats_url, database_url=database_url, instance_id=name,
                                           agent_health_interval_s=0.15, leader_lock_ttl_s=3,
                                           agent_probe_timeout_s=1))
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await service.stop()


async def test_one_elected_poller_probes_and_drives_circuit_and_status(nats_url: str, database_url: str) -> None:
    behaviour = AgentBehaviour()
    async with running_agent(behaviour) as agent, platform_of(nats_url, database_url, runtime=False,
                                                               agents=False) as p:
        c = p.client
        async with poller(nats_url, database_url, "poller-a") as a, poller(nats_url, database_url, "poller-b") as b:
            # the two replicas also share the agent commands (one durable consumer)
            r = await c.post("/api/agents", json={"agent_id": "watched", "name": "Watched", "channel": "web",
                                                  "base_url": agent.base_url, "capabilities": ["a"]})
            assert r.status_code == 201, r.text
            await eventually(lambda: _true(len(behaviour.health_hits) >= 6))
            probers = set(behaviour.health_hits)
            assert len(probers) == 1, behaviour.health_hits  # only the leader polls
            leader, follower = (a, b) if probers == {"poller-a"} else (b, a)
            assert leader.lock.is_leader
            assert not follower.lock.is_leader
            assert follower.polls == 0

            async def detail() -> dict[str, Any]:
                return (await c.get("/api/agents/watched")).json()  # type: ignore[no-any-return]

            assert (await detail())["last_probe_at"] is not None
            behaviour.healthy = False
            # the circuit event and the status event are two appends: wait until the projection has both
            opened = await eventually(lambda: _matching(
                detail, lambda d: d["circuit_state"] == "open" and d["status"] != "online"))
            assert opened["status"] == "offline"
            assert opened["consecutive_failures"] >= 3
            assert opened["circuit_open_at"].endswith("Z")

            # the leader stops; the other replica takes the lock and carries on
            hits_before = len(behaviour.health_hits)
            await _stop(leader)
            behaviour.healthy = True
            closed = await eventually(lambda: _matching(
                detail, lambda d: d["circuit_state"] == "closed" and d["status"] != "offline"))
            assert closed["status"] == "online"
            assert closed["consecutive_failures"] == 0
            assert set(behaviour.health_hits[hits_before:]) == {follower.instance}
            assert follower.lock.is_leader

            events = (await _agent_events(p.nats_url, "watched"))
            assert [t for t in events if t != "agent_registered"][:4] == [
                "agent_circuit_opened", "agent_status_changed", "agent_circuit_closed", "agent_status_changed"]


async def _true(value: bool) -> bool:
    return value


async def _matching(get: Callable[[], Any], predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    value: dict[str, Any] = await get()
    return value if predicate(value) else None


async def _stop(service: AgentService) -> None:
    """Stop a poller the way a replica shuts down: its tasks end and it gives the lock up."""
    for t in service._tasks:
        t.cancel()
    await service.stop()


async def _agent_events(nats_url: str, agent_id: str) -> list[str]:
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"lo.evt.agent.{agent_id}.>", ordered_consumer=True)
        types = []
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:
                break
            types.append(msg.subject.rsplit(".", 1)[-1])
        return types
    finally:
        await nc.close()

