"""Group commit of checkpoints (langorch_runtime.checkpoints): concurrent runs' checkpoint writes share
transactions, every run's checkpoints read back as LangGraph wrote them, and a write that fails fails only its own
caller."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import psycopg
import pytest
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from langorch_runtime.checkpoints import GroupCommit, GroupCommitSaver

RUNS = 24
NODES = 4


class Count(TypedDict):
    n: int
    trail: list[str]


def graph(saver: AsyncPostgresSaver) -> Any:
    g: StateGraph[Count] = StateGraph(Count)

    async def step(state: Count) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"n": state["n"] + 1, "trail": [*state["trail"], f"n{state['n']}"]}

    for i in range(NODES):
        g.add_node(f"s{i}", step)
        g.add_edge(START if i == 0 else f"s{i - 1}", f"s{i}")
    g.add_edge(f"s{NODES - 1}", END)
    return g.compile(checkpointer=saver)


async def open_pool(database_url: str) -> AsyncConnectionPool[Any]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url, min_size=1, max_size=4, open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row})
    await pool.open()
    return pool


@pytest.mark.integration
async def test_concurrent_runs_share_commits_and_read_back_whole(database_url: str) -> None:
    pool = await open_pool(database_url)
    try:
        group = GroupCommit(pool)
        calls = 0
        write = group.write

        async def counted(statements: Any, barrier: Any = None) -> None:
            nonlocal calls
            calls += 1
            await write(statements, barrier)

        group.write = counted  # type: ignore[method-assign]
        savers = [GroupCommitSaver(pool, group) for _ in range(4)]
        apps = [graph(s) for s in savers]

        async def run(i: int) -> dict[str, Any]:
            config = {"configurable": {"thread_id": f"group-{i}"}}
            out: dict[str, Any] = await apps[i % len(apps)].ainvoke({"n": 0, "trail": []}, config, durability="sync")
            return out

        official = AsyncPostgresSaver(pool)
        await graph(official).ainvoke({"n": 0, "trail": []}, {"configurable": {"thread_id": "official"}},
                                      durability="sync")
        expected = [c.checkpoint["channel_values"]
                    async for c in official.alist({"configurable": {"thread_id": "official"}})]
        outs = await asyncio.gather(*(run(i) for i in range(RUNS)))
        assert all(o == {"n": NODES, "trail": [f"n{k}" for k in range(NODES)]} for o in outs)
        # every run's checkpoints and history read back, through a saver of the official kind
        for i in range(RUNS):
            saver = savers[(i + 1) % len(savers)]
            latest = await saver.aget_tuple({"configurable": {"thread_id": f"group-{i}", "checkpoint_ns": ""}})
            assert latest is not None
            assert latest.checkpoint["channel_values"]["n"] == NODES
            history = [c.checkpoint["channel_values"]
                       async for c in saver.alist({"configurable": {"thread_id": f"group-{i}"}})]
            assert history == expected  # the same checkpoints as the official saver writes for the same run
        assert calls >= RUNS * NODES  # at least one write per super-step of each run
        assert group.groups < calls  # and fewer transactions than writes: concurrent runs shared them
    finally:
        await pool.close()


@pytest.mark.integration
async def test_a_failing_write_fails_only_its_caller(database_url: str) -> None:
    pool = await open_pool(database_url)
    try:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE group_probe (n int PRIMARY KEY)")
        group = GroupCommit(pool)
        good = [[("INSERT INTO group_probe VALUES (%s)", (n,), False)] for n in range(1, 6)]
        bad = [("INSERT INTO group_probe VALUES (%s)", (3,), False)]  # a key another write of the group takes
        outcomes = await asyncio.gather(*(group.write(s) for s in [*good[:3], bad, *good[3:]]),
                                        return_exceptions=True)
        assert [o is None for o in outcomes] == [True, True, True, False, True, True]
        assert isinstance(outcomes[3], psycopg.errors.UniqueViolation)
        async with pool.connection() as conn:
            rows = await (await conn.execute("SELECT n FROM group_probe ORDER BY n")).fetchall()
        assert [r["n"] for r in rows] == [1, 2, 3, 4, 5]
    finally:
        await pool.close()
