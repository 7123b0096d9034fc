"""One runtime replica follows the agent registry (``lo.evt.agent.>`` from sequence 0) once: its agent service
reads the dispatcher's registry instead of replaying the agent events a second time, and the elected poller still
probes every agent it knows of."""

from __future__ import annotations

import asyncio
import contextlib

import nats
import pytest

from ckp_core.commands import RegisterAgent
from ckp_core.events import Actor
from ckp_core.subjects import EVENT_STREAM
from langorch_infra.jetstream import publish_command
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agent_dispatch import AgentDispatcher
from langorch_runtime.agents import AgentService
from langorch_runtime.queries import RuntimeQueries
from langorch_runtime.service import RuntimeService, host
from tests.agent_server import AgentBehaviour, running_agent
from tests.helpers import wait_until


@pytest.mark.unit
def test_host_gives_the_agent_service_the_dispatchers_registry() -> None:
    replica = host(RuntimeSettings(metrics_port=0))
    [runs] = [c for c in replica.components if isinstance(c, RuntimeService)]
    [agents] = [c for c in replica.components if isinstance(c, AgentService)]
    assert agents.followed is runs.dispatcher
    assert [c for c in replica.components if isinstance(c, RuntimeQueries)]


@pytest.mark.integration
async def test_the_agent_service_reads_a_followed_registry_without_a_consumer_of_its_own(
        nats_url: str, database_url: str) -> None:
    settings = RuntimeSettings(nats_url=nats_url, database_url=database_url, instance_id="once",
                               agent_health_interval_s=0.1, leader_lock_ttl_s=3, agent_probe_timeout_s=1)
    behaviour = AgentBehaviour()
    dispatcher = AgentDispatcher(settings)
    await dispatcher.start()
    service = AgentService(settings, followed=dispatcher)
    await service.start()
    task = asyncio.create_task(service.run())
    nc = await nats.connect(nats_url)
    try:
        async with running_agent(behaviour) as agent:
            js = nc.jetstream()
            await publish_command(js, RegisterAgent(
                actor=Actor(kind="user", id="operator"), agent_id="solo", name="Solo", channel="web",
                protocol="http", base_url=agent.base_url, concurrency_limit=1, resource_key="solo",
                pool_id="web_default", capabilities=[{"name": "a", "type": "tool"}], labels={},
                token_sha256="0" * 64))
            # the command is decided, the dispatcher's follower applies it, and the poller probes what it sees
            await wait_until(lambda: len(behaviour.health_hits), lambda hits: hits >= 2, timeout=20)
            assert "solo" in dispatcher.registry
            assert service.registry == {}  # nothing replayed into a registry of its own
            info = await js.stream_info(EVENT_STREAM)
            assert info.state.consumer_count == 1  # the dispatcher's ordered consumer only
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await service.stop()
        await dispatcher.stop()
        await nc.close()
