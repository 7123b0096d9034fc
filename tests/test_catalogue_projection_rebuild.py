"""The lifecycle, deployment, project and agent projections are pure functions of LO_EVT: dropping and
replaying them gives row-for-row identical tables (api.md §1.5)."""

from __future__ import annotations

import asyncpg
import pytest

from langorch_gateway.projector import rebuild
from langorch_infra.jetstream import connect
from tests.agent_server import running_agent
from tests.helpers import platform_of, procedure_doc

pytestmark = pytest.mark.integration

DUMPS = {
    "procedures": "SELECT * FROM procedures ORDER BY procedure_id, version",
    "procedure_deployments": "SELECT * FROM procedure_deployments ORDER BY deployment_id",
    "projects": "SELECT * FROM projects ORDER BY project_id",
    "agents": "SELECT * FROM agents ORDER BY agent_id",
}


async def dump(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(database_url)
    try:
        return {table: [tuple(r.values()) for r in await conn.fetch(q)] for table, q in DUMPS.items()}
    finally:
        await conn.close()


async def test_rebuild_of_catalogue_tables_gives_identical_rows(nats_url: str, database_url: str) -> None:
    async with running_agent() as agent, platform_of(nats_url, database_url, runtime=False) as p:
        c = p.client
        project = (await c.post("/api/projects", json={"name": "Rebuilt"})).json()["project_id"]
        assert (await c.patch(f"/api/projects/{project}", json={"description": "after"})).status_code == 200
        gone = (await c.post("/api/projects", json={"name": "Gone"})).json()["project_id"]
        assert (await c.delete(f"/api/projects/{gone}")).status_code == 204
        for v in ("1.0.0", "2.0.0", "3.0.0"):
            doc = procedure_doc("rb", v, retrieval_metadata={"tags": ["t"], "domain": "ops"})
            assert (await c.post("/api/procedures", json={"ckp_json": doc, "project_id": project})).status_code == 201
        doc = procedure_doc("rb", "3.0.0", description="edited")
        assert (await c.put("/api/procedures/rb/3.0.0", json={"ckp_json": doc})).status_code == 200
        for v in ("1.0.0", "2.0.0"):
            assert (await c.post(f"/api/procedures/rb/{v}/promote", json={"target_channel": "qa"})).status_code == 200
        assert (await c.post("/api/procedures/rb/2.0.0/rollback", json={"target_channel": "qa"})).status_code == 200
        assert (await c.patch("/api/procedures/rb/3.0.0/status", json={"status": "archived"})).status_code == 200
        assert (await c.delete("/api/procedures/rb/3.0.0")).status_code == 200
        for i in range(2):
            r = await c.post("/api/agents", json={"agent_id": f"rb{i}", "name": f"rb{i}", "channel": "rb",
                                                  "base_url": agent.base_url, "capabilities": ["a"]})
            assert r.status_code == 201, r.text
        assert (await c.patch("/api/agents/rb0", json={"labels": {"k": "v"}, "status": "draining"})).status_code \
            == 200
        assert (await c.post("/api/agents/rb0/token")).status_code == 200
        assert (await c.delete("/api/agents/rb1")).status_code == 204
        await p.app.state.projector.catch_up()
    before = await dump(database_url)
    assert [len(before[t]) for t in DUMPS] == [2, 3, 1, 1]

    nc = await connect(nats_url, "test-rebuild")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await rebuild(pool, nc.jetstream())
    finally:
        await pool.close()
        await nc.close()
    assert await dump(database_url) == before
