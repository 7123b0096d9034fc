"""The gateway awaits a command's outcome as its projector receives it (it receives every event anyway), instead
of creating an ordered consumer on the aggregate for every command; while the projector is not live (catching up
from its stored position) it still creates one. Either way the outcome is not missed, and nothing awaited stays
registered. Real NATS and PostgreSQL; the JetStream API requests are counted on the server's subjects."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest

from langorch_gateway import projector as projector_module
from tests.helpers import Platform, example, import_procedure, platform_of

pytestmark = pytest.mark.integration

RUN = {"procedure_id": "e2e_test_procedure", "procedure_version": "1.0.0"}


@contextlib.asynccontextmanager
async def consumer_creations(nats_url: str) -> AsyncIterator[list[str]]:
    """The subjects of the consumer creations any client asks ``LO_EVT`` for while the block runs."""
    seen: list[str] = []
    nc = await nats.connect(nats_url)

    async def note(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    await nc.subscribe("$JS.API.CONSUMER.CREATE.LO_EVT.>", cb=note)
    await nc.subscribe("$JS.API.CONSUMER.CREATE.LO_EVT", cb=note)
    await nc.flush()
    try:
        yield seen
    finally:
        await nc.flush()
        await nc.close()


async def live(platform: Platform) -> None:
    """Until the gateway's projector has received an event as it was appended."""
    deadline = asyncio.get_running_loop().time() + 30
    while not platform.app.state.projector.live:
        assert asyncio.get_running_loop().time() < deadline, "the projector never became live"
        await asyncio.sleep(0.05)


async def test_a_live_projector_receives_the_outcomes_and_no_consumer_is_created(platform: Platform) -> None:
    c = platform.client
    await import_procedure(c, example("minimal_greeting.ckp.json"))
    await live(platform)
    async with consumer_creations(platform.nats_url) as created:
        for _ in range(3):
            r = await c.post("/api/runs", json=RUN)
            assert r.status_code == 201, r.text
            assert r.json()["status"] in ("created", "running", "completed")
    assert created == []
    assert platform.app.state.projector._outcomes == {}


async def test_a_projector_that_is_not_live_leaves_the_outcome_to_a_consumer_of_the_aggregate(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(projector_module, "LIVE_PENDING", -1)  # every message leaves "too many" behind it
    c = platform.client
    await import_procedure(c, example("minimal_greeting.ckp.json"))
    assert platform.app.state.projector.live is False
    async with consumer_creations(platform.nats_url) as created:
        r = await c.post("/api/runs", json=RUN)
        assert r.status_code == 201, r.text
    assert len(created) == 1
    assert platform.app.state.projector._outcomes == {}


async def test_an_outcome_that_never_comes_is_forgotten(nats_url: str, database_url: str) -> None:
    # no runtime to decide the creation: 202 pending once the command timeout has passed
    async with platform_of(nats_url, database_url, runtime=False, creation=False,
                           gateway_settings={"command_timeout_s": 0.5}) as p:
        await import_procedure(p.client, example("minimal_greeting.ckp.json"))
        await live(p)
        r = await p.client.post("/api/runs", json=RUN)
        assert r.status_code == 202, r.text
        assert p.app.state.projector._outcomes == {}
