"""Group commit of checkpoints (langorch_runtime.checkpoints): concurrent runs' checkpoint writes share
transactions, every run's checkpoints read back as LangGraph wrote them, and a write that fails fails only its own
caller."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, TypedDict

import psycopg
import pytest
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
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


class Asked(TypedDict):
    n: int
    notes: dict[str, Any]
    answer: str | None


def asking_graph(saver: AsyncPostgresSaver) -> Any:
    """Two steps, then one that interrupts and is resumed: blobs, task writes and the interrupt's special writes."""
    g: StateGraph[Asked] = StateGraph(Asked)

    async def grow(state: Asked) -> dict[str, Any]:
        return {"n": state["n"] + 1, "notes": {**state["notes"], f"k{state['n']}": [state["n"], "x" * 40]}}

    async def ask(state: Asked) -> dict[str, Any]:
        return {"answer": interrupt({"question": state["n"]})}

    g.add_node("a", grow)
    g.add_node("b", grow)
    g.add_node("ask", ask)
    g.add_edge(START, "a")
    g.add_edge("a", "b")
    g.add_edge("b", "ask")
    g.add_edge("ask", END)
    return g.compile(checkpointer=saver)


async def stored_rows(pool: AsyncConnectionPool[Any], thread: str) -> dict[str, list[Any]]:
    """A thread's rows in the saver's three tables, without what differs between two runs (ids, times, thread)."""
    def counter(version: Any) -> Any:  # a channel version is "<counter>.<random fraction>"
        return version.split(".", 1)[0] if isinstance(version, str) else version

    def plain(checkpoint: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in checkpoint.items() if k not in ("id", "ts")}
        out["channel_versions"] = {c: counter(v) for c, v in out["channel_versions"].items()}
        out["versions_seen"] = {node: {c: counter(v) for c, v in seen.items()}
                                for node, seen in out["versions_seen"].items()}
        return out

    async with pool.connection() as conn:
        checkpoints = await (await conn.execute(
            "SELECT checkpoint, metadata, parent_checkpoint_id IS NULL AS first FROM checkpoints"
            " WHERE thread_id = %s ORDER BY checkpoint_id", (thread,))).fetchall()
        blobs = await (await conn.execute(
            "SELECT channel, type, blob FROM checkpoint_blobs WHERE thread_id = %s ORDER BY channel, version",
            (thread,))).fetchall()
        writes = await (await conn.execute(
            "SELECT channel, type, blob, idx, task_path FROM checkpoint_writes WHERE thread_id = %s"
            " ORDER BY checkpoint_id, task_path, idx", (thread,))).fetchall()
    return {"checkpoints": [(plain(r["checkpoint"]), r["metadata"], r["first"]) for r in checkpoints],
            "blobs": [tuple(r.values()) for r in blobs],
            "writes": [tuple(r.values()) for r in writes if r["channel"] != "__interrupt__"],
            "interrupts": [r["idx"] for r in writes if r["channel"] == "__interrupt__"]}


@pytest.mark.integration
async def test_rows_as_the_official_saver_writes_them_without_a_thread(database_url: str) -> None:
    """GroupCommitSaver writes checkpoints and task writes itself (serialised on the event loop, not in a
    thread as the official saver does): the rows it leaves are those the official saver leaves for the same run,
    an interrupt and its resumption included, and no write hands its serialisation to the loop's executor."""
    pool = await open_pool(database_url)
    try:
        async def run(saver: AsyncPostgresSaver, thread: str) -> dict[str, Any]:
            app, config = asking_graph(saver), {"configurable": {"thread_id": thread}}
            await app.ainvoke({"n": 0, "notes": {}, "answer": None}, config, durability="sync")
            out: dict[str, Any] = await app.ainvoke(Command(resume="yes"), config, durability="sync")
            return out

        official = await run(AsyncPostgresSaver(pool), "rows-official")
        loop = asyncio.get_running_loop()
        handed: list[Any] = []
        real = loop.run_in_executor

        def counted(executor: Any, func: Any, *args: Any) -> Any:
            target = func.args[0] if isinstance(func, functools.partial) and func.args else func
            handed.append(getattr(target, "__name__", repr(target)))
            return real(executor, func, *args)

        loop.run_in_executor = counted  # type: ignore[method-assign]
        try:
            ours = await run(GroupCommitSaver(pool, GroupCommit(pool)), "rows-group")
        finally:
            loop.run_in_executor = real  # type: ignore[method-assign]
        assert ours == official == {"n": 2, "notes": {"k0": [0, "x" * 40], "k1": [1, "x" * 40]}, "answer": "yes"}
        # the writes' serialisation stays on the loop (reading a resumed thread's pending writes does not)
        assert [name for name in handed if name.startswith("_dump")] == []
        expected, written = await stored_rows(pool, "rows-official"), await stored_rows(pool, "rows-group")
        assert len(expected["checkpoints"]) >= 4
        assert expected["blobs"]
        assert expected["writes"]
        assert expected["interrupts"]  # the interrupt's own write (its id differs from run to run)
        assert written == expected
    finally:
        await pool.close()
