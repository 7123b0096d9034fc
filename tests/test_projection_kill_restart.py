"""api.md §1.5 / issue 5: a projection stopped in the middle of the stream and restarted ends identical to a
rebuild from the stream (every projection table, row for row)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from langorch_gateway.projector import TABLES, Projector, rebuild
from tests.helpers import example, import_procedure, platform_of, wait_status, wait_until

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
    async with platform_of(nats_url, database_url, gateway_settings={"ryw_timeout_ms": 1000}) as p:
        c = p.client
        await import_procedure(c, example("internal_variables.ckp.json"))
        await import_procedure(c, example("product_enrichment_pipeline.ckp.json"))
        first = (await c.post("/api/runs", json={"procedure_id": "internal-variables",
                                                 "procedure_version": "1.0.0"})).json()["run_id"]
        await wait_status(c, first)
        await p.app.state.projector.stop()  # killed mid-stream: the runs below are not projected meanwhile
        for mode in ("standard", "premium"):
            r = await c.post("/api/runs", json={"procedure_id": "product-enrichment-demo",
                                                "procedure_version": "1.0.0",
                                                "input_vars": {"product_id": 3, "enrichment_mode": mode}})
            assert r.status_code == 202  # accepted, but the projection cannot show it yet
        # a gateway-owned write is durable at its append: answered from the event, marked stale
        r = await c.post("/api/projects", json={"name": "while-down"})
        assert r.status_code == 201, r.text
        assert r.headers["X-LangOrch-Consistency"] == "stale"
        assert (r.json()["name"], r.json()["procedure_count"]) == ("while-down", 0)
        # a command accepted by its service but not yet visible: 202, never a 404 of what was just created
        r = await c.post("/api/agents", json={"name": "down-agent", "channel": "web",
                                              "base_url": "http://127.0.0.1:9", "capabilities": ["navigate"]})
        assert r.status_code == 202, r.text
        assert r.json()["command_type"] == "register_agent"
        await asyncio.sleep(2)  # the runtime keeps appending while the projector is down
        restarted = Projector(p.app.state.pool, p.app.state.js)
        restarted.start()
        p.app.state.projector = restarted
        previous: list[dict[str, list[tuple[object, ...]]]] = [{}]

        async def caught_up() -> tuple[bool, dict[str, list[tuple[object, ...]]]]:
            await restarted.catch_up()
            now = await dump(p.app.state.pool)
            same, previous[0] = now == previous[0], now
            return same, now

        # until the projection holds what the platform ends with (both enrichment runs wait for an approval, each
        # opened, the agent registered) and two reads in a row agree: nothing is appended any more
        _, after_restart = await wait_until(caught_up, lambda got: got[0] and len(got[1]["runs"]) == 3 and len(
            got[1]["approvals"]) == 2 and len(got[1]["agents"]) == 1, every=0.25)
        await restarted.stop()
        await rebuild(p.app.state.pool, p.app.state.js)
        rebuilt = await dump(p.app.state.pool)
    assert len(after_restart["runs"]) == 3
    assert len(after_restart["approvals"]) == 2  # both enrichment modes wait for approval
    assert [r for r in after_restart["projects"] if "while-down" in r]
    assert len(after_restart["agents"]) == 1
    assert after_restart == rebuilt
