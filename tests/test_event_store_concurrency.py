"""Issue 2 acceptance: two writers appending to one run with the same expected position — exactly one wins.
The same contract runs against the in-memory adapter and the JetStream adapter."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest

from ckp_core.errors import ConcurrencyError
from ckp_core.events import Actor, Log, RunCreated, make_event
from ckp_core.eventstore import EventStore, MemoryEventStore
from ckp_core.ids import new_id
from ckp_core.subjects import aggregate_filter
from langorch_infra import direct_get
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology, follow

pytestmark = pytest.mark.integration

ACTOR = Actor.system("test")


@pytest.fixture(params=["memory", "jetstream"])
async def store(request: pytest.FixtureRequest, nats_url: str) -> AsyncIterator[EventStore]:
    if request.param == "memory":
        yield MemoryEventStore()
        return
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_topology(js)
    yield JetStreamEventStore(js)
    await nc.close()


def created(run_id: str) -> object:
    return make_event(RunCreated(procedure_id="p", procedure_version="1", root_run_id=run_id),
                      aggregate_id=run_id, seq=1, actor=ACTOR)


async def test_two_writers_with_the_same_expected_position_one_wins(store: EventStore) -> None:
    run_id = new_id()
    [first] = await store.append([created(run_id)], expected_position=0)  # type: ignore[list-item]
    a = make_event(Log(level="INFO", message="a"), aggregate_id=run_id, seq=2, actor=ACTOR)
    b = make_event(Log(level="INFO", message="b"), aggregate_id=run_id, seq=2, actor=ACTOR)
    results = await asyncio.gather(store.append([a], expected_position=first),
                                   store.append([b], expected_position=first), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["ConcurrencyError", "list"]
    events = await store.read("run", run_id)
    assert [e.envelope.seq for e in events] == [1, 2]
    assert events[1].envelope.data["message"] in ("a", "b")


async def test_other_aggregates_do_not_conflict(store: EventStore) -> None:
    one, two = new_id(), new_id()
    await store.append([created(one)], expected_position=0)  # type: ignore[list-item]
    await store.append([created(two)], expected_position=0)  # type: ignore[list-item]
    head = await store.head("run", one)
    assert head is not None
    assert head.seq == 1


async def test_a_new_aggregate_must_be_new(store: EventStore) -> None:
    run_id = new_id()
    await store.append([created(run_id)], expected_position=0)  # type: ignore[list-item]
    with pytest.raises(ConcurrencyError):
        await store.append([make_event(Log(level="INFO", message="x"), aggregate_id=run_id, seq=1,
                                       actor=ACTOR)], expected_position=0)


async def test_reappending_the_same_event_is_idempotent(store: EventStore) -> None:
    run_id = new_id()
    event = created(run_id)
    [p1] = await store.append([event], expected_position=0)  # type: ignore[list-item]
    [p2] = await store.append([event], expected_position=0)  # type: ignore[list-item]
    assert p1 == p2
    assert len(await store.read("run", run_id)) == 1


async def test_reads_leave_no_consumer_behind(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that cannot use a batch direct get (a replica behind the leader answered) reads through an ordered
    consumer; it is deleted when the read ends, not left to expire: nats-server caps a stream at 1,000 consumers by
    default, and a burst of reads (the runtime reads a run's history for each of its commands) must never hit
    ``maximum consumers limit reached``."""
    async def behind(*_: object) -> None:
        return None

    monkeypatch.setattr(direct_get, "read_range", behind)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        store = JetStreamEventStore(js)
        run_id = new_id()
        await store.append([created(run_id)], expected_position=0)  # type: ignore[list-item]
        before = (await js.stream_info("LO_EVT")).state.consumer_count
        for _ in range(20):
            assert [e.envelope.seq for e in await store.read("run", run_id)] == [1]
        # the consumers are gone as soon as the reads return (they would linger 5 s if only unsubscribed)
        assert (await js.stream_info("LO_EVT")).state.consumer_count <= before
        for _ in range(11):  # 1,100 reads within a second or two, 100 at a time: above the cap if they lingered
            reads = await asyncio.gather(*(store.read("run", run_id) for _ in range(100)))
            assert all(len(events) == 1 for events in reads)
    finally:
        await nc.close()


async def test_a_history_is_read_in_batches_without_a_consumer(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read is one batch direct get per ``BATCH`` events (no consumer), equal to what a consumer delivers, from
    any position; a range the answering replica does not reach is refused (``None``), never shortened."""
    monkeypatch.setattr(direct_get, "BATCH", 7)  # several batches for a 20-event history
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        store = JetStreamEventStore(js)
        run_id, other = new_id(), new_id()
        position = (await store.append([created(run_id)], expected_position=0))[0]  # type: ignore[list-item]
        await store.append([created(other)], expected_position=0)  # type: ignore[list-item]  # interleaved
        for seq in range(2, 21):
            [position] = await store.append(
                [make_event(Log(level="INFO", message=f"m{seq}"), aggregate_id=run_id, seq=seq, actor=ACTOR)],
                expected_position=position)
        before = (await js.stream_info("LO_EVT")).state.consumer_count
        events = await store.read("run", run_id)
        assert [e.envelope.seq for e in events] == list(range(1, 21))
        assert (await js.stream_info("LO_EVT")).state.consumer_count == before
        through_consumer = []
        async with contextlib.aclosing(follow(js, aggregate_filter("run", run_id))) as stream:
            async for stored in stream:
                through_consumer.append(stored)
                if len(through_consumer) == 20:
                    break
        assert [(e.position, e.envelope.event_id) for e in events] == [
            (e.position, e.envelope.event_id) for e in through_consumer]
        later = await store.read("run", run_id, after_position=events[9].position)
        assert [e.envelope.seq for e in later] == list(range(11, 21))
        filt = aggregate_filter("run", run_id)
        assert await direct_get.read_range(nc, "LO_EVT", filt, 0, events[-1].position + 5) is None
        assert await direct_get.read_range(nc, "LO_EVT", filt, 0, events[4].position) == events[:5]
    finally:
        await nc.close()
