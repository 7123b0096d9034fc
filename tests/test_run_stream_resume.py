"""api.md §5.7: a client that disconnects from a run's SSE stream and reconnects with Last-Event-ID receives
exactly the events it missed — no gap, no duplicate."""

from __future__ import annotations

import pytest

from tests.helpers import Platform, events_of, follow_run, import_procedure, start_run, wait_status

pytestmark = pytest.mark.integration

DOC = {"procedure_id": "chatty", "version": "1", "workflow_graph": {"start_node": "each", "nodes": {
    "each": {"type": "loop", "iterator": "[1, 2, 3, 4, 5, 6]", "iterator_variable": "n", "body_node": "say",
             "next_node": "done"},
    "say": {"type": "sequence", "steps": [{"step_id": "log", "action": "log", "message": "n={{n}}"},
                                          {"step_id": "pause", "action": "wait", "duration_ms": 30}]},
    "done": {"type": "terminate", "outputs": {"last": "{{n}}"}}}}}


async def test_reconnecting_with_last_event_id_gets_exactly_the_missed_events(platform: Platform) -> None:
    c = platform.client
    await import_procedure(c, DOC)
    run_id = await start_run(c, "chatty")
    first, end = await follow_run(c, run_id, limit=7)  # then the client goes away mid-run
    assert end is None
    assert len(first) == 7
    rest, end = await follow_run(c, run_id, last_event_id=int(first[-1]["stream_seq"]))
    assert end == "completed"
    await wait_status(c, run_id)
    everything = await events_of(c, run_id)
    received = first + rest
    assert [e["seq"] for e in received] == [e["seq"] for e in everything]
    assert len({e["event_id"] for e in received}) == len(received)
