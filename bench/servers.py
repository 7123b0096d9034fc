"""The servers of one benchmark: NATS JetStream and a fresh PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from langorch_infra.embedded import EmbeddedNats, EmbeddedPostgres


async def fresh_database(url: str, name: str) -> str:
    """Create the database ``name`` empty (dropped first when it exists) on the server of ``url``; its URL."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return url.rsplit("/", 1)[0] + "/" + name


@contextlib.asynccontextmanager
async def bench_servers(database: str) -> AsyncIterator[tuple[str, str]]:
    """``(nats_url, database_url)``: the servers of LANGORCH_TEST_NATS_URL / LANGORCH_TEST_DATABASE_URL when set,
    else embedded ones started here and stopped at the end (PostgreSQL without fsync: the data is thrown away), and
    the database ``database`` on that PostgreSQL, created empty."""
    tmp = Path(tempfile.mkdtemp())
    nats_url = os.environ.get("LANGORCH_TEST_NATS_URL")
    pg_url = os.environ.get("LANGORCH_TEST_DATABASE_URL")
    servers: list[EmbeddedNats | EmbeddedPostgres] = []
    try:
        if not nats_url:
            servers.append(EmbeddedNats(tmp / "nats").start())
            nats_url = servers[-1].url
        if not pg_url:
            servers.append(EmbeddedPostgres(tmp / "pg", fsync=False).start())
            pg_url = servers[-1].url
        yield nats_url, await fresh_database(pg_url, database)
    finally:
        for s in servers:
            s.stop()
