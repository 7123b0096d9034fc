"""The gateway's PostgreSQL pool, whose connections keep no session state between uses.

asyncpg resets a connection at every release by default (``pg_advisory_unlock_all``, ``CLOSE ALL``, ``UNLISTEN *``,
``RESET ALL``): one more round trip for each pooled query, about half of those an API read makes. The gateway never
leaves such state behind — no ``SET``, ``LISTEN`` or held cursors, and its session advisory locks are taken through
:func:`advisory_lock`, which ends the session when it cannot release one — so its pool skips that query. An open
transaction is still rolled back at release (asyncpg does that before any custom reset).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset: nothing to undo (see the module docstring)."""


async def open_pool(database_url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size, reset=_no_session_state)
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def advisory_lock(conn: Any, key: int) -> AsyncIterator[None]:
    """Hold the session advisory lock ``key`` on ``conn`` (a pooled connection) for the block. When the lock cannot
    be known to be released — taking or releasing it failed or was canceled — the connection is terminated, which
    releases every lock of its session, so no pooled connection keeps one."""
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", key)
    except BaseException:
        conn.terminate()
        raise
    try:
        yield
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
        except BaseException:
            conn.terminate()
            raise
