"""A run's checkpoint is never ahead of its events (langorch_runtime.checkpoints barriers, RunWriter.stored).

The checkpoint of a super-step is written while the super-step's events are still being appended: its statements
are sent to PostgreSQL at once, and the transaction commits only once the run's barrier says the events are
stored. These tests hold a barrier open and look at PostgreSQL from another connection, fail a barrier in a shared
group, and make a real append fail (another writer appended to the run on NATS JetStream first) under a real
LangGraph saver: the checkpoint is then not written at all."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import psycopg
import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from psycopg_pool import AsyncConnectionPool

from ckp_core.errors import ConcurrencyError
from ckp_core.events import Actor, ExecutionStarted
from ckp_core.eventstore import AggregateHead
from ckp_core.redaction import Redactor
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology
from langorch_runtime.checkpoints import GroupCommit, GroupCommitSaver
from langorch_runtime.executor import RunWriter
from tests.test_checkpoint_group_commit import open_pool

ACTOR = Actor.system("runtime")
DEADLINE_S = 20.0


@contextlib.asynccontextmanager
async def probe_pool(database_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    """A pool like the runtime's, on a database holding the ``barrier_probe`` table the writes go to."""
    pool = await open_pool(database_url)
    try:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE barrier_probe (n int PRIMARY KEY)")
        yield pool
    finally:
        await pool.close()


async def rows(database_url: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        found = await (await conn.execute("SELECT n FROM barrier_probe ORDER BY n")).fetchall()
    return [r[0] for r in found]


async def open_transaction_with(database_url: str, text: str) -> bool:
    """Whether a backend sits in an open transaction whose last statement mentions ``text``."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        found = await (await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE %s",
            (f"%{text}%",))).fetchone()
    return bool(found and found[0])


@pytest.mark.integration
async def test_the_statements_are_sent_at_once_and_committed_after_the_barrier(database_url: str) -> None:
    async with probe_pool(database_url) as pool:
        group = GroupCommit(pool)
        stored = asyncio.Event()

        async def barrier() -> None:
            await stored.wait()

        write = asyncio.create_task(group.write([("INSERT INTO barrier_probe VALUES (%s)", (1,), False)], barrier))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        # the insert has run inside the open transaction while the barrier is still open …
        while not await open_transaction_with(database_url, "barrier_probe"):
            assert loop.time() < deadline, "the statements were not sent before the barrier ended"
            await asyncio.sleep(0.02)
        # … but nothing is committed, and the caller still waits
        assert await rows(database_url) == []
        assert not write.done()
        stored.set()
        await asyncio.wait_for(write, DEADLINE_S)
        assert await rows(database_url) == [1]


@pytest.mark.integration
async def test_a_failed_barrier_keeps_its_write_out_and_the_group_goes_on(database_url: str) -> None:
    async with probe_pool(database_url) as pool:
        group = GroupCommit(pool)

        async def refused() -> None:
            await asyncio.sleep(0.05)
            raise ConcurrencyError("run r: expected position 4, found 5")

        async def fine() -> None:
            await asyncio.sleep(0.01)

        writes = [group.write([("INSERT INTO barrier_probe VALUES (%s)", (n,), False)],
                              refused if n == 3 else fine if n % 2 else None) for n in range(1, 6)]
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        assert [o is None for o in outcomes] == [True, True, False, True, True]
        assert isinstance(outcomes[2], ConcurrencyError)  # the caller sees why: its run's events were refused
        assert await rows(database_url) == [1, 2, 4, 5]


@pytest.mark.integration
async def test_a_checkpoint_after_a_refused_append_is_not_written(nats_url: str, database_url: str) -> None:
    """The runtime's path: a run's saver holds its writer's barrier. Another writer appends to the run first, so
    the run's queued event is refused; the checkpoint LangGraph writes after it fails with that refusal and is
    not in PostgreSQL, while the checkpoint of a run whose events were stored is."""
    nc = await nats.connect(nats_url)
    pool = await open_pool(database_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        store = JetStreamEventStore(js)
        lost, kept = f"barrier-{uuid.uuid4().hex[:12]}", f"barrier-{uuid.uuid4().hex[:12]}"
        writers = {run: RunWriter(store, run, AggregateHead(0, 0), Redactor(), ACTOR, None) for run in (lost, kept)}
        saver = GroupCommitSaver(pool, GroupCommit(pool), {run: w.stored for run, w in writers.items()})
        other = RunWriter(store, lost, AggregateHead(0, 0), Redactor(), ACTOR, None)
        await other.emit(ExecutionStarted(entry_node_id="a", execution_mode="production", runtime_instance="other"))

        async def checkpoint(run: str) -> RunnableConfig:
            await writers[run].emit_soon(ExecutionStarted(entry_node_id="a", execution_mode="production",
                                                          runtime_instance="this"))
            config: RunnableConfig = {"configurable": {"thread_id": run, "checkpoint_ns": ""}}
            return await saver.aput(config, empty_checkpoint(), {"source": "loop", "step": 0, "parents": {}}, {})

        outcomes: list[Any] = await asyncio.gather(checkpoint(lost), checkpoint(kept), return_exceptions=True)
        refused, written = outcomes
        assert isinstance(refused, ConcurrencyError), refused
        assert not isinstance(written, BaseException), written
        assert await saver.aget_tuple({"configurable": {"thread_id": lost, "checkpoint_ns": ""}}) is None
        assert await saver.aget_tuple({"configurable": {"thread_id": kept, "checkpoint_ns": ""}}) is not None
        assert [e.envelope.data["runtime_instance"] for e in await store.read("run", kept)] == ["this"]
        assert [e.envelope.data["runtime_instance"] for e in await store.read("run", lost)] == ["other"]
    finally:
        await pool.close()
        await nc.close()
