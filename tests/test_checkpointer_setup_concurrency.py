"""Runtime replicas that start together on an empty database both get their checkpointer: LangGraph's saver
migrations (``CREATE INDEX CONCURRENTLY`` waits for every open transaction) are serialised without leaving one
replica's lock wait open as a transaction the other's index build waits for."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from langorch_runtime.service import open_checkpointer

pytestmark = pytest.mark.integration

TRIES = 3
REPLICAS = 3


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_replicas_starting_together_on_an_empty_database_all_open_their_checkpointer(
        pg_server_url: str) -> None:
    for _ in range(TRIES):
        name = f"lo_empty_{uuid.uuid4().hex[:12]}"
        await _admin(pg_server_url, f'CREATE DATABASE "{name}"')
        url = pg_server_url.rsplit("/", 1)[0] + f"/{name}"
        try:
            opened = await asyncio.wait_for(asyncio.gather(*(open_checkpointer(url) for _ in range(REPLICAS))), 60)
            for pool, saver in opened:
                assert await saver.aget_tuple({"configurable": {"thread_id": "none", "checkpoint_ns": ""}}) is None
                await pool.close()
        finally:
            await _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
