"""A gateway that stops answers its open requests itself, before the server's graceful-shutdown timeout: a command
still undecided is ``202`` pending (carried out later, as at ``LANGORCH_COMMAND_TIMEOUT_S``), a read whose
projection is behind is served marked stale. Uvicorn cancels what is still open at its timeout, and a request
cancelled before its answer began got ``500 Internal Server Error`` in plain text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.helpers import Platform, import_procedure, platform_of, serve_app

pytestmark = pytest.mark.integration

GRACE_S = 2  # the second server's graceful-shutdown timeout; commands (10 s) and projections (5 s) wait longer
DOC = {"procedure_id": "drained", "version": "1", "workflow_graph": {"start_node": "end", "nodes": {
    "end": {"type": "terminate"}}}}


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    # nothing decides run creations: a start waits for its outcome until it is told pending
    async with platform_of(nats_url, database_url, runtime=False, creation=False, approvals=False) as p:
        yield p


async def until_logged(database_url: str, aggregate: str, deadline_s: float = 20) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + deadline_s
        while not await conn.fetchval("SELECT count(*) FROM api_command_log WHERE aggregate = $1", aggregate):
            assert time.monotonic() < deadline, f"no {aggregate} command logged within {deadline_s} s"
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


async def test_a_start_open_when_the_gateway_stops_is_answered_pending(platform: Platform) -> None:
    await import_procedure(platform.client, DOC)
    async with httpx.AsyncClient(timeout=60) as c:
        # a second server of the same application, stopped while the start waits (the platform's keeps serving)
        async with serve_app(platform.app, lifespan="off", timeout_graceful_shutdown=GRACE_S,
                             what="the stopping server") as base:
            start = asyncio.create_task(c.post(f"{base}/api/runs", json={"procedure_id": "drained",
                                                                         "procedure_version": "1"}))
            await until_logged(platform.database_url, "run")
            assert not start.done(), start.result().text
            stopping = time.monotonic()
        answered = await start
        took = time.monotonic() - stopping
    assert answered.status_code == 202, answered.text
    body = answered.json()
    assert body["status"] == "pending"
    assert answered.headers["Location"] == f"/api/commands/{body['command_id']}"
    assert took < GRACE_S, f"the server stopped after {took:.2f} s, at its timeout: the request was cut off"
    # the command is kept: it is still pending, to be carried out once run creation runs again
    command = await platform.client.get(f"/api/commands/{body['command_id']}")
    assert command.status_code == 200, command.text
    assert command.json()["status"] == "pending"


async def test_a_read_waiting_for_its_projection_when_the_gateway_stops_is_served_stale(platform: Platform) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        async with serve_app(platform.app, lifespan="off", timeout_graceful_shutdown=GRACE_S,
                             what="the stopping server") as base:
            # a position the projection will not reach: the read waits up to LANGORCH_RYW_TIMEOUT_MS (5 s)
            read = asyncio.create_task(c.get(f"{base}/api/runs", headers={"X-LangOrch-Min-Position": "999999999"}))
            await asyncio.sleep(0.3)
            assert not read.done(), read.result().text
            stopping = time.monotonic()
        answered = await read
        took = time.monotonic() - stopping
    assert answered.status_code == 200, answered.text
    assert answered.headers["X-LangOrch-Consistency"] == "stale"
    assert took < GRACE_S, f"the server stopped after {took:.2f} s, at its timeout: the request was cut off"


async def test_an_open_event_stream_ends_when_the_gateway_stops(platform: Platform) -> None:
    """The stream ends at once (the client's EventSource reconnects with its Last-Event-ID to a replica that
    serves) instead of holding the stop until the server cuts it off."""
    stream_grace_s = 10
    lines: list[str] = []
    opened = asyncio.Event()

    async def follow(base: str) -> None:
        async with httpx.AsyncClient(timeout=60) as c, c.stream("GET", f"{base}/api/approvals/stream") as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                lines.append(line)
                opened.set()

    async with serve_app(platform.app, lifespan="off", timeout_graceful_shutdown=stream_grace_s,
                         what="the stopping server") as base:
        following = asyncio.create_task(follow(base))
        await asyncio.wait_for(opened.wait(), 20)
        stopping = time.monotonic()
    took = time.monotonic() - stopping
    await asyncio.wait_for(following, 10)  # ended, without a transport error
    assert took < stream_grace_s / 2, f"the server stopped after {took:.2f} s: the stream held it"
    assert ": langorch approval stream" in lines
