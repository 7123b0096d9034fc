"""The projector sends a batch's writes in few round trips (``StatementBatch``: grouped by SQL text, reordered only
across tables and aggregates), and the tables end exactly as when every event is applied on its own, in order."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from ckp_core.events import (
    Actor,
    EventData,
    EventEnvelope,
    ExecutionStarted,
    LlmUsage,
    NodeCompleted,
    NodeStarted,
    ProcedureImported,
    ProcedureReplaced,
    ProjectCreated,
    ProjectDeleted,
    ProjectUpdated,
    RunCompleted,
    RunCreated,
    RunDeleted,
    StepCompleted,
    StepStarted,
    make_event,
)
from ckp_core.eventstore import StoredEvent
from langorch_gateway.projector import TABLES, Projector, StatementBatch, apply_event, ensure_schema
from tests.test_projection_kill_restart import dump
from tests.test_run_projection_rules import SCRIPTS

RUNTIME = Actor.system("runtime")


class Recording:
    """A connection that records what it is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[tuple[Any, ...]]]] = []

    async def execute(self, sql: str, *args: Any) -> None:
        self.sent.append(("execute", sql, [args]))

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.sent.append(("executemany", sql, rows))


@pytest.mark.unit
async def test_statements_keep_their_order_per_table_and_owner_and_share_round_trips_otherwise() -> None:
    batch = StatementBatch()
    insert, update = "INSERT INTO t (id) VALUES ($1)", "UPDATE t SET n = n + $2 WHERE id = $1"
    for owner, sql, n in (("a", insert, 0), ("b", insert, 0), ("a", update, 1), ("c", insert, 0), ("a", update, 2),
                          ("b", update, 3), ("c", update, 4), ("c", insert, 5), ("c", update, 6)):
        batch.owner = owner
        await batch.execute(sql, owner, n) if sql == update else await batch.execute(sql, owner)
    batch.owner = None  # a statement of no known owner stays between what comes before and after it
    await batch.execute("UPDATE t SET n = 0")
    batch.owner = "a"
    await batch.execute(update, "a", 7)
    await batch.execute("UPDATE u SET m = 1 WHERE id = $1", "a")  # another table: not after a's update of t
    conn = Recording()
    assert await batch.send(conn) == 7
    assert conn.sent == [
        ("executemany", insert, [("a",), ("b",), ("c",)]),
        ("executemany", update, [("a", 1), ("a", 2), ("b", 3), ("c", 4)]),  # a's two in their order
        ("execute", insert, [("c",)]),  # after c's update of t, so in the next wave
        ("execute", update, [("c", 6)]),
        ("execute", "UPDATE t SET n = 0", [()]),
        ("execute", update, [("a", 7)]),
        ("execute", "UPDATE u SET m = 1 WHERE id = $1", [("a",)]),
    ]
    assert await batch.send(conn) == 0  # sending empties it


def run_script(run_id: str, rng: random.Random) -> list[EventData | tuple[str, dict[str, Any]]]:
    """A run's events: a small run with two LLM calls (their token counts add up), sometimes deleted and created
    again, or one of the run-rule scripts."""
    if rng.random() < 0.3:
        return list(SCRIPTS[rng.choice(sorted(SCRIPTS))])
    created = RunCreated(procedure_id="p", procedure_version="1", root_run_id=run_id, input_vars={"n": 1})
    step = {"node_id": "n1", "step_id": "s1", "frame": "-", "attempt": 1, "action": "set_variable"}
    events: list[EventData | tuple[str, dict[str, Any]]] = [
        created, ExecutionStarted(entry_node_id="n1", execution_mode="production"),
        NodeStarted(node_id="n1", node_type="sequence", node_name=None, visit=1),
        StepStarted(**step, binding_kind="internal", idempotency_key=f"{run_id}:s1"),
        StepCompleted(**step, duration_ms=rng.randrange(9)),
        LlmUsage(node_id="n1", model="m", prompt_tokens=rng.randrange(500), completion_tokens=7,
                 estimated_cost_usd=0.000119),
        LlmUsage(node_id="n1", model="m", prompt_tokens=3, completion_tokens=rng.randrange(90),
                 estimated_cost_usd=None),
        NodeCompleted(node_id="n1", node_type="sequence", next_node=None, duration_ms=1),
        RunCompleted(outputs={"n": rng.randrange(9)}),
    ]
    if rng.random() < 0.2:
        events += [RunDeleted(), created, ExecutionStarted(entry_node_id="n1", execution_mode="production")]
    return events


def stream(seed: int, runs: int = 40) -> list[EventEnvelope]:
    """The events of ``runs`` runs and a few projects, interleaved at random (each aggregate's in order), with
    some delivered twice."""
    rng = random.Random(seed)
    lanes: list[list[EventEnvelope]] = []
    for r in range(runs):
        run_id = f"run-{seed}-{r}"
        lanes.append([
            make_event(e, aggregate_id=run_id, seq=i, actor=RUNTIME) if isinstance(e, EventData) else
            EventEnvelope(type=e[0], aggregate="run", aggregate_id=run_id, seq=i, actor=RUNTIME, data=e[1])
            for i, e in enumerate(run_script(run_id, rng), start=1)])
    for p in range(3):
        project_id = f"project-{seed}-{p}"
        lanes.append([make_event(e, aggregate_id=project_id, seq=i, actor=RUNTIME) for i, e in enumerate(
            (ProjectCreated(project_id=project_id, name="a"), ProjectUpdated(project_id=project_id, name="b"),
             ProjectDeleted(project_id=project_id), ProjectCreated(project_id=project_id, name="c")), start=1)])
    procedure_id = f"procedure-{seed}"  # each replacement adds one to its revision: applied twice, it shows
    document = {"procedure_id": procedure_id, "content_hash": "h", "compiler_version": "1", "ir_key": "k",
                "variables_schema": {}, "name": "p", "description": None}
    lanes.append([make_event(e, aggregate_id=procedure_id, seq=i, actor=RUNTIME) for i, e in enumerate(
        [ProcedureImported(**document, version="1", ckp_json={"n": 0}),
         *(ProcedureReplaced(**document, version="1", ckp_json={"n": n}) for n in range(1, 6))], start=1)])
    out: list[EventEnvelope] = []
    while lanes:
        lane = rng.choice(lanes)
        out.append(lane.pop(0))
        if rng.random() < 0.03:
            out.append(out[rng.randrange(len(out))])  # a redelivered event
        if not lane:
            lanes.remove(lane)
    return out


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert created is not None
    try:
        await ensure_schema(created)
        yield created
    finally:
        await created.close()


@pytest.mark.integration
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batches_give_the_rows_of_one_event_at_a_time(pool: asyncpg.Pool, seed: int,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    events = [StoredEvent(env, position) for position, env in enumerate(stream(seed), start=1)]
    async with pool.acquire() as conn:
        for stored in events:
            await apply_event(conn, stored)
    one_at_a_time = await dump(pool)
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)}, projection_positions")  # fixed table names
    projector = Projector(pool, None)  # type: ignore[arg-type]  # applies batches; follows no stream
    rng = random.Random(seed)
    with caplog.at_level(logging.WARNING, logger="langorch_gateway.projector"):
        i = 0
        while i < len(events):
            size = rng.choice((1, 7, 60, 500))
            await projector.apply_batch(list(events[i:i + size]))
            i += size
    assert not caplog.records  # no batch fell back to message by message
    assert await dump(pool) == one_at_a_time
    assert projector.position == len(events)
    assert await pool.fetchval("SELECT position FROM projection_positions WHERE name = 'core'") == len(events)
    assert await pool.fetchval("SELECT count(*) FROM projection_dead_letters") == 0
    assert len(one_at_a_time["runs"]) > 30


@pytest.mark.integration
async def test_two_projectors_of_one_name_apply_each_event_once(pool: asyncpg.Pool,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A second gateway replica's projector finds the position moved on by the first at its commit, rolls its batch
    back and applies only what is left, also when both apply batches at the same time."""
    events = [StoredEvent(env, position) for position, env in enumerate(stream(4), start=1)]
    async with pool.acquire() as conn:
        for stored in events:
            await apply_event(conn, stored)
    one_at_a_time = await dump(pool)
    async with pool.acquire() as conn:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)}, projection_positions")  # fixed table names
    first, second = Projector(pool, None), Projector(pool, None)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="langorch_gateway.projector"):
        await first.apply_batch(events[:100])
        await second.apply_batch(events[:150])  # it holds position 0, the first moved it to 100
        assert "moved on from 0" in caplog.text
        for i in range(150, len(events), 40):
            await asyncio.gather(first.apply_batch(events[i - 50:i + 40]), second.apply_batch(events[i:i + 40]))
    assert "message by message" not in caplog.text
    assert await dump(pool) == one_at_a_time
    assert await pool.fetchval("SELECT revision FROM procedures WHERE procedure_id = 'procedure-4'") == 6
    assert first.position == second.position == len(events)
    assert await pool.fetchval("SELECT position FROM projection_positions WHERE name = 'core'") == len(events)
