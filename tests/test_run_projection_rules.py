"""The ``runs`` projection keeps the run aggregate's rule (``ckp_core.runs``): after every event the row's
``status`` and ``waiting_on`` are what :func:`ckp_core.runs.fold` gives the writer, the resume rule is applied
from the row's current status, and an event at or below the row's ``seq`` changes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from ckp_core import runs
from ckp_core.events import Actor, EventEnvelope
from ckp_core.eventstore import StoredEvent
from langorch_gateway.projector import apply_event, ensure_schema

pytestmark = pytest.mark.integration

RUNTIME = Actor.system("runtime")
# complete payloads of their classes (the projector decodes every event; damaged data is a dead letter)
CREATED = {"procedure_id": "p", "procedure_version": "1", "input_vars": {}, "root_run_id": "root"}
STARTED = {"entry_node_id": "start", "execution_mode": "production"}
RECOVERED = {"delivery_count": 2, "checkpoint_id": None}
SUSPENDS = {"suspends_run": True}
RESUMES = {"resumes_run": True}
APPROVAL = {"approval_id": "a1", "decision_type": "approve_reject"}
CHILD = {"procedure_id": "child", "version": "1"}

SCRIPTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "approval": [("run_created", CREATED), ("execution_started", STARTED),
                 ("node_started", {"node_id": "review", "node_type": "human_approval", "node_name": None, "visit": 1}),
                 ("approval_requested", {**APPROVAL, **SUSPENDS}),
                 ("approval_decision_received", {"approval_id": "a1", "status": "approved", "source": "human",
                                                 **RESUMES}),
                 ("execution_resumed", {"resume_reason": "approval_decision"}), ("run_completed", {"outputs": {}}),
                 ("subflow_completed", {"child_run_id": "late", **CHILD, **RESUMES})],
    "child_run_resumed_first": [("run_created", CREATED), ("execution_started", STARTED),
                                ("subflow_started", {"child_run_id": "c1", **CHILD, **SUSPENDS}),
                                ("execution_resumed", {"resume_reason": "subflow"}),
                                ("subflow_completed", {"child_run_id": "c1", **CHILD, **RESUMES}),
                                ("run_cancel_requested", {}), ("run_canceled", {})],
    "callback_retry_and_recovery": [
        ("run_created", CREATED), ("execution_started", STARTED),
        ("workflow_delegated", {"node_id": "n", "step_id": "s", "expires_at": "2030-01-01T00:00:00Z",
                                "delegation_id": "d1", "action": "invoke", **SUSPENDS}),
        ("run_canceled", {}), ("run_retry_requested", {"retry_count": 1}),
        ("execution_resumed", {"resume_reason": "retry"}),
        ("run_suspended", {"status": "paused", "waiting_on": [{"kind": "callback", "id": "d1", "node_id": "n"}]}),
        ("callback_timed_out", {"node_id": "n", "delegation_id": "d1", "timeout_s": 30, **RESUMES}),
        ("execution_recovered", RECOVERED), ("run_failed", {"error": {"code": "x", "message": "m"}})],
    "suspended_without_waits": [("run_created", CREATED), ("execution_started", STARTED),
                                ("approval_requested", {**APPROVAL, "suspends_run": False}),
                                ("run_suspended", {"status": "waiting_approval", "waiting_on": []}),
                                ("execution_recovered", RECOVERED)],
}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert created is not None
    try:
        await ensure_schema(created)
        yield created
    finally:
        await created.close()


async def row(conn: Any, run_id: str) -> tuple[str, Any, int]:
    r = await conn.fetchrow("SELECT status, waiting_on, seq FROM runs WHERE run_id = $1", run_id)
    assert r is not None
    return r["status"], json.loads(r["waiting_on"]) if r["waiting_on"] is not None else None, r["seq"]


@pytest.mark.parametrize("script", list(SCRIPTS))
async def test_the_projected_status_is_the_aggregates(pool: asyncpg.Pool, script: str) -> None:
    run_id = f"run-{script}"
    events = [EventEnvelope(type=t, aggregate="run", aggregate_id=run_id, seq=i, actor=RUNTIME, data=d)
              for i, (t, d) in enumerate(SCRIPTS[script], start=1)]
    async with pool.acquire() as conn:
        for i, ev in enumerate(events):
            await apply_event(conn, StoredEvent(ev, 100 + i))
            state = runs.fold(events[:i + 1])
            assert await row(conn, run_id) == (state.status, state.waiting_on, ev.seq), ev.type
        before = await row(conn, run_id)
        for i, ev in enumerate(events[1:], start=1):  # redelivered or out of order: the seq guard keeps the row
            await apply_event(conn, StoredEvent(ev, 100 + i))
        assert await row(conn, run_id) == before


async def test_a_suspension_with_no_wait_left_stores_json_null(pool: asyncpg.Pool) -> None:
    """``run_suspended`` with an empty ``waiting_on`` writes JSON ``null`` (not SQL NULL), as it always did."""
    run_id = "run-null"
    script = [("run_created", CREATED), ("execution_started", STARTED),
              ("run_suspended", {"status": "paused", "waiting_on": []})]
    async with pool.acquire() as conn:
        for i, (t, d) in enumerate(script, start=1):
            ev = EventEnvelope(type=t, aggregate="run", aggregate_id=run_id, seq=i, actor=RUNTIME, data=d)
            await apply_event(conn, StoredEvent(ev, i))
        raw = await conn.fetchval("SELECT waiting_on::text FROM runs WHERE run_id = $1", run_id)
    assert raw == "null"
