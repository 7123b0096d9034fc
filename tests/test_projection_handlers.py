"""The gateway's projections are handlers keyed by event class (``langorch_gateway.projections``): a handler is
registered for the classes its ``event`` parameter names, a projection sees only its aggregate's events, an event
of an unknown type never stops the projector, and a typed read writes what the event carried."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ckp_core.events import (
    ANONYMOUS,
    EventEnvelope,
    RunCanceled,
    RunCompleted,
    RunCreated,
    RunFailed,
    UnknownEvent,
    make_event,
)
from ckp_core.eventstore import StoredEvent
from langorch_gateway import projections
from langorch_gateway.projections.base import ByEventClass, Conn, Projection, Recorded, event_classes
from langorch_gateway.projector import TABLES, apply_event, ensure_schema

GATEWAY = Path(projections.__file__).resolve().parent.parent


def recorded(event_type: str, data: dict[str, Any], aggregate: str = "run", seq: int = 1) -> Recorded:
    env = EventEnvelope(type=event_type, aggregate=aggregate, aggregate_id="r1", seq=seq,  # type: ignore[arg-type]
                        actor=ANONYMOUS, data=data)
    return Recorded(env, 10 + seq)


@pytest.mark.unit
def test_a_handler_is_registered_for_the_classes_its_event_parameter_names() -> None:
    async def ended(conn: Conn, event: RunCompleted | RunCanceled, rec: Recorded) -> None: ...

    async def untyped(conn: Conn, event: dict[str, Any], rec: Recorded) -> None: ...

    assert event_classes(ended) == (RunCompleted, RunCanceled)
    with pytest.raises(TypeError, match="event classes"):
        event_classes(untyped)
    handlers: ByEventClass[Any] = ByEventClass()
    handlers.register(ended)

    async def again(conn: Conn, event: RunCanceled, rec: Recorded) -> None: ...

    with pytest.raises(ValueError, match="RunCanceled already has a handler"):
        handlers.register(again)
    assert handlers.get(RunCompleted()) is ended
    assert handlers.get(UnknownEvent(type="x", schema_version=1)) is None


@pytest.mark.unit
async def test_a_projection_applies_its_aggregates_events_and_falls_back_for_the_rest() -> None:
    projection = Projection("test", "run", ("t",))
    seen: list[str] = []

    @projection.handles
    async def completed(conn: Conn, event: RunCompleted, rec: Recorded) -> None:
        seen.append(f"completed {event.outputs}")

    @projection.otherwise
    async def rest(conn: Conn, event: Any, rec: Recorded) -> None:
        seen.append(f"otherwise {type(event).__name__} {rec.envelope.type}")

    conn = None  # these handlers touch no table
    await projection.apply(conn, RunCompleted(outputs={"a": 1}), recorded("run_completed", {"outputs": {"a": 1}}))
    await projection.apply(conn, UnknownEvent(type="new_kind", schema_version=1), recorded("new_kind", {}))
    await projection.apply(conn, RunCompleted(), recorded("run_completed", {}, aggregate="approval"))
    assert seen == ["completed {'a': 1}", "otherwise UnknownEvent new_kind"]
    assert projection.handled == frozenset({RunCompleted})


@pytest.mark.unit
def test_the_projections_cover_the_projector_tables_once() -> None:
    tables = [t for p in projections.PROJECTIONS for t in p.tables]
    assert sorted(tables) == sorted(set(tables)) == sorted(TABLES)
    names = [p.name for p in projections.PROJECTIONS]
    assert len(names) == len(set(names))


@pytest.mark.unit
def test_no_projector_compares_event_type_strings() -> None:
    """Handlers are keyed by event class: no ``.type == "…"`` (or ``in (…)``) branch is left in the projectors."""
    sources = [GATEWAY / "projector.py", *sorted((GATEWAY / "projections").glob("*.py"))]
    offending = [f"{path.name}:{n}: {line.strip()}" for path in sources
                 for n, line in enumerate(path.read_text().splitlines(), start=1)
                 if re.search(r"\.type\s*(==|!=|in\b|not in\b)", line)]
    assert not offending, offending


# --- on the real tables ------------------------------------------------------------------------------------------


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
async def test_an_unknown_event_type_is_logged_with_its_run_and_skipped_elsewhere(pool: asyncpg.Pool) -> None:
    created = make_event(RunCreated(procedure_id="p", procedure_version="1", root_run_id="r1"), aggregate_id="r1",
                         seq=1, actor=ANONYMOUS)
    newer = EventEnvelope(type="from_a_newer_release", aggregate="run", aggregate_id="r1", seq=2, actor=ANONYMOUS,
                          schema_version=3, data={"node_id": "n1", "detail": "x"})
    elsewhere = EventEnvelope(type="from_a_newer_release", aggregate="approval", aggregate_id="a1", seq=1,
                              actor=ANONYMOUS, data={})
    async with pool.acquire() as conn:
        for i, env in enumerate((created, newer, elsewhere), start=1):
            await apply_event(conn, StoredEvent(env, i))
        run = await conn.fetchrow("SELECT status, seq, position FROM runs WHERE run_id = 'r1'")
        logged = await conn.fetch(
            "SELECT event_type, node_id, payload FROM run_events WHERE run_id = 'r1' ORDER BY seq")
        approvals = await conn.fetchval("SELECT count(*) FROM approvals")
    assert (run["status"], run["seq"], run["position"]) == ("created", 2, 2)
    assert [(r["event_type"], r["node_id"], json.loads(r["payload"])) for r in logged] == [
        ("run_created", None, created.data), ("from_a_newer_release", "n1", {"detail": "x"})]
    assert approvals == 0


@pytest.mark.integration
async def test_a_failed_runs_error_is_stored_as_the_event_carried_it(pool: asyncpg.Pool) -> None:
    """The typed read of ``error`` adds no defaults the writer did not send and keeps fields it does not know."""
    error = {"code": "boom", "message": "it broke", "vendor_code": 7}
    events = [make_event(RunCreated(procedure_id="p", procedure_version="1", root_run_id="r2"), aggregate_id="r2",
                         seq=1, actor=ANONYMOUS),
              EventEnvelope(type=RunFailed.TYPE, aggregate="run", aggregate_id="r2", seq=2, actor=ANONYMOUS,
                            data={"error": error, "outputs": {"partial": True}})]
    async with pool.acquire() as conn:
        for i, env in enumerate(events, start=1):
            await apply_event(conn, StoredEvent(env, i))
        row = await conn.fetchrow("SELECT status, error, output_vars, ended_at FROM runs WHERE run_id = 'r2'")
    assert row["status"] == "failed"
    assert json.loads(row["error"]) == error
    assert json.loads(row["output_vars"]) == {"partial": True}
    assert row["ended_at"] == events[1].occurred_at
