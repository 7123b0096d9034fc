"""api.md §1.5 / issue 5: a projection stopped in the middle of the stream and restarted ends identical to a
rebuild from the stream (every projection table, row for row)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from langorch_gateway.projector import TABLES, Projector, rebuild
from tests.conftest import platform_of
from tests.helpers import example, import_procedure
from tests.test_agent_runs import wait_status

pytestmark = pytest.mark.integration


async def dump(pool: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    out: dict[str, list[tuple[object, ...]]] = {}
    async with pool.acquire() as conn:
        for table in TABLES:
            rows = await conn.fetch(f"SELECT * FROM {table}")  # fixed table names
            out[table] = sorted((tuple(r.values()) for r in rows), key=repr)
    return out


async def test_projector_killed_mid_stream_then_restarted_equals_a_rebuild(nats_url: str,
                                                                          database_url: str) -> None:
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        await import_procedure(c, example("simple_http_test.ckp.json"))
        await import_procedure(c, example("product_enrichment_pipeline.ckp.json"))
        first = (await c.post("/api/runs", json={"procedure_id": "simple-http-test",
                                                 "procedure_version": "1.0.0"})).json()["run_id"]
        await wait_status(c, first)
        await p.app.state.projector.stop()  # killed mid-stream: the runs below are not projected meanwhile
        for mode in ("standard", "premium"):
            r = await c.post("/api/runs", json={"procedure_id": "product-enrichment-demo",
                                                "procedure_version": "1.0.0",
                                                "input_vars": {"product_id": 3, "enrichment_mode": mode}})
            assert r.status_code == 202  # accepted, but the projection cannot show it yet
        await asyncio.sleep(2)  # the runtime keeps appending while the projector is down
        restarted = Projector(p.app.state.pool, p.app.state.js)
        restarted.start()
        p.app.state.projector = restarted
        await restarted.catch_up()
        await asyncio.sleep(0.5)
        await restarted.catch_up()
        after_restart = await dump(p.app.state.pool)
        await restarted.stop()
        await rebuild(p.app.state.pool, p.app.state.js)
        rebuilt = await dump(p.app.state.pool)
    assert len(after_restart["runs"]) == 3
    assert after_restart == rebuilt
