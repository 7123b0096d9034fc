"""``GET /api/ready`` while a projection is behind and really not moving: its database writes blocked by a lock
another connection holds on its position row (as a long migration or a stuck transaction would). 503 once the
projector has been applying for ``LANGORCH_READY_STALL_S`` without moving, 200 again once it moves."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import pytest

from tests.helpers import TERMINAL, platform_of, start_document, wait_status

pytestmark = pytest.mark.integration

DEADLINE_S = 30.0

PLAIN = {"procedure_id": "stall", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
    "s": {"type": "sequence", "next_node": "done", "steps": [
        {"step_id": "x", "action": "set_variable", "variable": "x", "value": 1}]},
    "done": {"type": "terminate", "outputs": {}}}}}


async def ready_until(c: httpx.AsyncClient, status: int) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        r = await c.get("/api/ready")
        if r.status_code == status:
            return r.json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"/api/ready never answered {status}: {r.text}"
        await asyncio.sleep(0.2)


async def test_ready_is_503_while_the_projectors_writes_are_blocked_and_200_once_they_go_through(
        nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, gateway_settings={"ready_stall_s": 2, "ryw_timeout_ms": 300}) as p:
        c = p.client
        await wait_status(c, await start_document(c, PLAIN), TERMINAL)
        await ready_until(c, 200)
        blocker = await asyncpg.connect(database_url)
        try:
            tx = blocker.transaction()
            await tx.start()
            # the row every batch of the core projection locks first: its next batch waits for this transaction
            await blocker.execute("SELECT 1 FROM projection_positions WHERE name = 'core' FOR UPDATE")
            position = p.app.state.projector.position
            r = await c.post("/api/runs", json={"procedure_id": "stall", "procedure_version": "1"})
            assert r.status_code in (201, 202), r.text
            # 202 pending: the run was created, but its row is not projected (the wait for it ran out)
            body = await ready_until(c, 503)
            assert body["checks"]["projections"].startswith("core behind and not moving"), body
            assert body["checks"]["postgres"] == "ok", body  # the database answers: only the projection stands
            assert p.app.state.projector.position == position  # it really did not move
            await tx.rollback()
        finally:
            await blocker.close()
        body = await ready_until(c, 200)
        assert body["checks"]["projections"] == "ok", body
        # both runs projected and completed once the projection goes on
        deadline = time.monotonic() + DEADLINE_S
        while [run["status"] for run in (await c.get("/api/runs", params={"procedure_id": "stall"})).json()[
                "items"]] != ["completed", "completed"]:
            assert time.monotonic() < deadline, "the run created during the stall was not projected as completed"
            await asyncio.sleep(0.2)
