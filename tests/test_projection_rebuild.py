"""Issue 2 acceptance: after `langorch projections rebuild` the three tables are row-for-row identical."""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import pytest

from tests.helpers import example, follow_run, import_procedure, langorch_command, platform_of

pytestmark = pytest.mark.integration

DUMPS = {
    "procedures": "SELECT * FROM procedures ORDER BY procedure_id, version",
    "runs": "SELECT * FROM runs ORDER BY run_id",
    "run_events": "SELECT * FROM run_events ORDER BY run_id, seq",
}


async def dump(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(database_url)
    try:
        return {table: [tuple(r.values()) for r in await conn.fetch(q)] for table, q in DUMPS.items()}
    finally:
        await conn.close()


async def test_rebuild_gives_identical_rows(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        await import_procedure(c, example("internal_variables.ckp.json"))
        await import_procedure(c, example("minimal_greeting.ckp.json"))
        for body in ({"procedure_id": "internal-variables", "procedure_version": "1.0.0",
                      "input_vars": {"post_id": 7}},
                     {"procedure_id": "e2e_test_procedure", "procedure_version": "1.0.0"}):
            r = await c.post("/api/runs", json=body)
            assert r.status_code == 201, r.text
            _, end = await follow_run(c, r.json()["run_id"])
            assert end == "completed"
        await p.app.state.projector.catch_up()
    before = await dump(database_url)
    assert len(before["procedures"]) == 2
    assert len(before["runs"]) == 2
    assert len(before["run_events"]) > 10

    env = os.environ | {"LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url}
    proc = await asyncio.to_thread(subprocess.run, langorch_command("projections", "rebuild"), env=env,
                                   capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rebuilt" in proc.stdout
    after = await dump(database_url)
    assert after == before
