"""The servers of one benchmark: NATS JetStream and a fresh PostgreSQL database."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from bench.load import postmaster_pid
from langorch_infra.embedded import EmbeddedNats, EmbeddedPostgres

BENCH_NATS_SYNC = "2m"
"""JetStream's ``sync_interval`` of the benchmarks' embedded NATS server: the server's own default."""
SERVER_PIDS: list[int] = []
"""The processes of the embedded servers of the running benchmark (nats-server, PostgreSQL's postmaster): the roots
under which a benchmark counts their CPU."""


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
    else embedded ones started here and stopped at the end, and the database ``database`` on that PostgreSQL,
    created empty. The data is thrown away, so neither server syncs each write to disk: PostgreSQL runs without
    fsync and NATS with JetStream's own default sync interval (:data:`BENCH_NATS_SYNC`), which keeps these
    benchmarks' figures comparable with earlier ones. ``langorch up`` syncs both (its benchmarks say which)."""
    tmp = Path(tempfile.mkdtemp())
    nats_url = os.environ.get("LANGORCH_TEST_NATS_URL")
    pg_url = os.environ.get("LANGORCH_TEST_DATABASE_URL")
    servers: list[EmbeddedNats | EmbeddedPostgres] = []
    try:
        if not nats_url:
            nats = EmbeddedNats(tmp / "nats", sync=BENCH_NATS_SYNC).start()
            servers.append(nats)
            nats_url = nats.url
            if nats.proc is not None:
                SERVER_PIDS.append(nats.proc.pid)
        if not pg_url:
            pg = EmbeddedPostgres(tmp / "pg", fsync=False).start()
            servers.append(pg)
            pg_url = pg.url
            SERVER_PIDS.append(postmaster_pid(pg.pgdata))
        yield nats_url, await fresh_database(pg_url, database)
    finally:
        SERVER_PIDS.clear()
        for s in servers:
            s.stop()
