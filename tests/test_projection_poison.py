"""A poison message on ``LO_EVT`` (undecodable, or an event the projection cannot apply) is recorded in
``projection_dead_letters`` and skipped: the projections behind it keep moving, and a rebuild skips it the same
way (the tables are identical)."""

from __future__ import annotations

import asyncpg
import nats
import pytest

from ckp_core.events import ANONYMOUS, EventEnvelope
from ckp_core.ids import new_id
from langorch_gateway.projector import TABLES, rebuild
from langorch_infra.jetstream import encode_envelope
from tests.helpers import example, platform_of, start_document, wait_status
from tests.test_projection_kill_restart import dump

pytestmark = pytest.mark.integration


async def test_poison_events_are_dead_lettered_and_skipped(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            garbage_id = new_id()
            garbage = await js.publish(f"lo.evt.run.{garbage_id}.run_created", b"{not json")
            # a well-formed envelope whose payload lacks what the runs projection needs
            broken = EventEnvelope(type="run_created", aggregate="run", aggregate_id=new_id(), seq=1,
                                   actor=ANONYMOUS, data={"input_vars": {}})
            hollow = await js.publish(f"lo.evt.run.{broken.aggregate_id}.run_created", encode_envelope(broken))
        finally:
            await nc.close()
        run_id = await start_document(c, example("internal_variables.ckp.json"))
        run = await wait_status(c, run_id)
        assert run["status"] == "completed"
        await p.app.state.projector.catch_up(10)
        ready = (await c.get("/api/ready")).json()
        assert ready["status"] == "ready", ready
        pool: asyncpg.Pool = p.app.state.pool
        letters = [tuple(r.values()) for r in await pool.fetch(
            "SELECT name, position, subject FROM projection_dead_letters ORDER BY position")]
        assert letters == [("core", garbage.seq, f"lo.evt.run.{garbage_id}.run_created"),
                           ("core", hollow.seq, f"lo.evt.run.{broken.aggregate_id}.run_created")]
        errors = [r["error"] for r in await pool.fetch("SELECT error FROM projection_dead_letters ORDER BY position")]
        assert "ValidationError" in errors[1]
        assert "procedure_id" in errors[1]  # the field it lacks
        assert await pool.fetchval("SELECT count(*) FROM runs WHERE run_id = $1", broken.aggregate_id) == 0
        assert await pool.fetchval("SELECT count(*) FROM run_events WHERE run_id = $1", broken.aggregate_id) == 0
        live = await dump(pool)
        live_letters = letters
        await p.app.state.projector.stop()
        await rebuild(pool, p.app.state.js)
        assert await dump(pool) == live
        rebuilt_letters = [tuple(r.values()) for r in await pool.fetch(
            "SELECT name, position, subject FROM projection_dead_letters ORDER BY position")]
        assert rebuilt_letters == live_letters
    assert set(live) == set(TABLES)

