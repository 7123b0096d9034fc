"""A command whose log entry cannot be written (``api_command_log``) is not published, and the ordered consumer the
gateway made to await its outcome is let go: a failure there used to leave the subscription in the gateway's NATS
client for good, receiving the aggregate's later events."""

from __future__ import annotations

import asyncpg
import pytest

from tests.helpers import Platform, example, import_procedure

pytestmark = pytest.mark.integration


async def test_a_command_that_cannot_be_logged_leaves_no_subscription_and_is_not_sent(platform: Platform) -> None:
    c = platform.client
    await import_procedure(c, example("minimal_greeting.ckp.json"))
    nc, js = platform.app.state.nc, platform.app.state.js
    commands_before = (await js.stream_info("LO_CMD")).state.last_seq
    subscriptions_before = len(nc._subs)
    conn = await asyncpg.connect(platform.database_url)
    try:
        await conn.execute("ALTER TABLE api_command_log RENAME TO api_command_log_away")
        try:
            r = await c.post("/api/runs", json={"procedure_id": "e2e_test_procedure", "procedure_version": "1.0.0"})
        finally:
            await conn.execute("ALTER TABLE api_command_log_away RENAME TO api_command_log")
    finally:
        await conn.close()
    assert r.status_code >= 500, r.text
    assert len(nc._subs) == subscriptions_before
    assert platform.app.state.projector._outcomes == {}  # nor an outcome awaited through the projector
    assert (await js.stream_info("LO_CMD")).state.last_seq == commands_before
    r = await c.post("/api/runs", json={"procedure_id": "e2e_test_procedure", "procedure_version": "1.0.0"})
    assert r.status_code == 201, r.text
