"""The gateway's pool skips asyncpg's session reset at release (langorch_gateway.pool): what that reset would undo
must not survive a release anyway — a session advisory lock taken through ``advisory_lock`` is released whatever
happens in its block, and a transaction left open is rolled back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from langorch_gateway.pool import advisory_lock, open_pool

KEY = 424242


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The gateway's kind of pool, with one connection: every use after the first reuses it."""
    opened = await open_pool(database_url, min_size=1, max_size=1)
    yield opened
    await opened.close()


async def lock_free(database_url: str) -> bool:
    """Whether another session can take the lock ``KEY`` now (and it gives it back at once)."""
    other = await asyncpg.connect(database_url)
    try:
        taken = bool(await other.fetchval("SELECT pg_try_advisory_lock($1)", KEY))
        if taken:
            await other.execute("SELECT pg_advisory_unlock($1)", KEY)
        return taken
    finally:
        await other.close()


@pytest.mark.integration
async def test_an_advisory_lock_never_outlives_its_block(database_url: str, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, advisory_lock(conn, KEY):
        assert not await lock_free(database_url)
    assert await lock_free(database_url)

    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, advisory_lock(conn, KEY):
            raise RuntimeError("the block failed")
    assert await lock_free(database_url)

    entered = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire() as conn, advisory_lock(conn, KEY):
            entered.set()
            await asyncio.sleep(60)

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(entered.wait(), 30)
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert await lock_free(database_url)
    # the pool's one connection still serves queries (a new one when the canceled block's was terminated)
    assert await pool.fetchval("SELECT 1") == 1


@pytest.mark.integration
async def test_a_transaction_left_open_is_rolled_back_at_release(pool: asyncpg.Pool) -> None:
    await pool.execute("CREATE TABLE pool_probe (n int)")
    conn = await pool.acquire()
    await conn.execute("BEGIN")
    await conn.execute("INSERT INTO pool_probe VALUES (1)")
    await pool.release(conn)
    async with pool.acquire() as again:
        assert again.is_in_transaction() is False
        assert await again.fetchval("SELECT count(*) FROM pool_probe") == 0
