"""A ``new_only`` follower (a live stream opened without history: ``GET /api/runs/{id}/stream`` with no
``Last-Event-ID``, the approvals stream) that had received nothing yet when NATS restarted: once its connection is
back it resumes after the stream's last sequence at its start, so an event appended while it was reconnecting is
not lost (a consumer made again with "deliver new" started after it)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
import pytest

from ckp_core.events import Actor, Log, RunCreated, make_event
from ckp_core.ids import new_id
from ckp_core.subjects import EVENT_STREAM, aggregate_filter
from langorch_infra.embedded import EmbeddedNats
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology, follow

pytestmark = pytest.mark.integration

ACTOR = Actor.system("test")
DEADLINE_S = 30.0


async def test_a_new_only_follower_gets_what_was_appended_while_it_reconnected(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    run_id = new_id()
    writer = follower = None
    task: asyncio.Task[None] | None = None
    try:
        writer = await nats.connect(server.url)
        await ensure_topology(writer.jetstream())
        [before] = await JetStreamEventStore(writer.jetstream()).append([make_event(
            RunCreated(procedure_id="p", procedure_version="1", root_run_id=run_id),
            aggregate_id=run_id, seq=1, actor=ACTOR)], expected_position=0)
        await writer.close()
        # the follower's connection comes back 2 s after the server: what is appended meanwhile is after its start
        follower = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=2)
        js = follower.jetstream()
        received: list[str] = []
        subscribed = asyncio.Event()

        async def follow_it() -> None:
            async for stored in follow(js, aggregate_filter("run", run_id), new_only=True):
                received.append(stored.envelope.data.get("message", stored.envelope.type))

        task = asyncio.create_task(follow_it())
        while not subscribed.is_set():  # its ordered consumer exists: it follows, having received nothing
            if any(not c.config.durable_name for c in await js.consumers_info(EVENT_STREAM)):
                subscribed.set()
            await asyncio.sleep(0.02)
        server.kill()
        server.start()
        writer = await nats.connect(server.url)
        await JetStreamEventStore(writer.jetstream()).append([make_event(
            Log(level="INFO", message="while reconnecting"), aggregate_id=run_id, seq=2, actor=ACTOR)],
            expected_position=before)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while not received:
            assert loop.time() < deadline, "the event appended while the follower reconnected never came"
            await asyncio.sleep(0.05)
        assert received == ["while reconnecting"]  # and not the run_created from before it started
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError
                await task
        for nc in (writer, follower):
            if nc is not None:
                with contextlib.suppress(Exception):  # the server may be gone already
                    await nc.close()
        server.stop()
