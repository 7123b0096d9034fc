"""A replica's presence renewal through a NATS outage (``langorch_infra.presence``): each failed renewal is one
warning line naming the outage, not a traceback (they came every few seconds per service while a server
restarted), and the key is renewed again once the server is back. A real NATS server, stopped and restarted."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from ckp_core.subjects import PRESENCE_BUCKET
from langorch_infra.embedded import EmbeddedNats
from langorch_infra.jetstream import connect, ensure_topology
from langorch_infra.presence import Presence

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0


async def until(condition: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


async def test_renewals_during_an_outage_are_one_line_each(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = EmbeddedNats(tmp_path / "nats", sync="2m").start()
    nc = await connect(server.url, "presence-outage")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        presence = Presence(js, "runtime", "outage-1", "test", BaseSettings(), ttl_s=1.0)
        await presence.start()
        caplog.set_level(logging.WARNING, logger="langorch_infra.presence")
        server.kill()

        def failed() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "put failed" in r.getMessage()]

        await until(lambda: len(failed()) >= 2, "no failed renewal was logged while NATS was down")
        for record in failed():
            assert "NATS unavailable" in record.getMessage(), record.getMessage()
            assert record.exc_info is None, "a traceback was logged for a NATS outage"

        server.start()  # the same port and data: the client reconnects and the renewals go on
        kv = await js.key_value(PRESENCE_BUCKET)
        seen = len(failed())

        async def renewed() -> bool:
            try:
                entry = await kv.get(presence.key)
            except Exception:  # still reconnecting
                return False
            return entry is not None and entry.value is not None

        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while not await renewed():
            assert loop.time() < deadline, "the key was not renewed after the server came back"
            await asyncio.sleep(0.1)
        assert len(failed()) >= seen
        await presence.stop()
    finally:
        await nc.close()
        server.stop()
