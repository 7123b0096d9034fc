"""The run's writer appends queued events in order without holding the run up, and never lets an event get ahead
of what it depends on: the step records written before it, or a failed append (executor.RunWriter); the step
store answers a fresh run's reads from memory and keeps one identity's writes in order (steps.StepStore); the runs
share one compiled graph (executor.build_graph)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from ckp_core.events import Actor, EventEnvelope, Log
from ckp_core.eventstore import AggregateHead, ConcurrencyError, MemoryEventStore
from ckp_core.redaction import Redactor
from langorch_runtime.executor import RunWriter, build_graph
from langorch_runtime.steps import StepRecord, StepStore, now_iso

pytestmark = pytest.mark.unit


class GatedStore(MemoryEventStore):
    """Appends only when the test lets it (one ``gate`` release per append)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Semaphore(0)
        self.attempts = 0

    async def append(self, events: Sequence[EventEnvelope], *, expected_position: int) -> list[int]:
        self.attempts += 1
        await self.gate.acquire()
        return await super().append(events, expected_position=expected_position)


class GatedKv:
    """A KV bucket whose puts land only when released, in any order the test chooses."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.waiting: list[tuple[str, bytes, asyncio.Event]] = []
        self.gets = 0

    async def put(self, key: str, value: bytes) -> int:
        landed = asyncio.Event()
        self.waiting.append((key, value, landed))
        await landed.wait()
        self.values[key] = value
        return len(self.values)

    async def get(self, key: str) -> Any:
        self.gets += 1
        raise AssertionError("a fresh run's store must not read KV")

    def release(self, index: int = 0) -> None:
        self.waiting.pop(index)[2].set()


def writer(store: MemoryEventStore) -> RunWriter:
    return RunWriter(store, "run-1", AggregateHead(0, 0), Redactor(), Actor.system("runtime"), None)


def log_event(text: str) -> Log:
    return Log(node_id="n", step_id="s", level="info", message=text)


async def settle_loop() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def record(status: Literal["started", "completed", "failed"] = "completed") -> StepRecord:
    return StepRecord(status=status, attempt=1, idempotency_key="k", node_id="n", step_id="s", frame="-",
                      updated_at=now_iso())


async def test_emit_soon_returns_at_once_and_flush_waits_for_every_queued_event_in_order() -> None:
    store = GatedStore()
    w = writer(store)
    assert [await w.emit_soon(log_event(str(i))) for i in range(3)] == [1, 2, 3]  # numbered without waiting
    assert (await store.read("run", "run-1")) == []
    flushed = asyncio.create_task(w.flush())
    await settle_loop()
    assert not flushed.done()
    for _ in range(3):
        store.gate.release()
    await asyncio.wait_for(flushed, 5)
    stored = await store.read("run", "run-1")
    assert [e.envelope.data["message"] for e in stored] == ["0", "1", "2"]
    assert [e.envelope.seq for e in stored] == [1, 2, 3]
    assert (w.seq, w.position) == (3, stored[-1].position)


async def test_a_failed_append_drops_the_queued_events_and_fails_the_next_emit_and_flush() -> None:
    store = MemoryEventStore()
    w = writer(store)
    other = writer(store)
    await other.emit(log_event("another writer"))  # the run's head moved behind w's back
    await w.emit_soon(log_event("a"))
    await w.emit_soon(log_event("b"))
    with pytest.raises(ConcurrencyError):
        await w.flush()
    with pytest.raises(ConcurrencyError):
        await w.emit_soon(log_event("c"))
    assert [e.envelope.data["message"] for e in await store.read("run", "run-1")] == ["another writer"]
    await w.refresh()  # the head re-read: the writer goes on after the other writer's event
    await w.emit(log_event("after"))
    assert [e.envelope.data["message"] for e in await store.read("run", "run-1")] == ["another writer", "after"]


async def test_an_event_waits_for_the_step_records_written_before_it_and_a_flush_for_every_record() -> None:
    store = MemoryEventStore()
    kv = GatedKv()
    steps = StepStore(kv, "run-1")  # type: ignore[arg-type]
    steps.start_empty()
    w = writer(store)
    w.before = steps.pending
    await w.emit_soon(log_event("before the record"))
    steps.put_soon("n:s:-", record())
    await w.emit_soon(log_event("after the record"))
    seen = await steps.get("n:s:-")  # read back at once, from memory
    assert seen is not None
    assert seen.status == "completed"
    await settle_loop()
    assert [e.envelope.data["message"] for e in await store.read("run", "run-1")] == ["before the record"]
    flushed = asyncio.create_task(w.flush())
    await settle_loop()
    assert not flushed.done()
    kv.release()
    await asyncio.wait_for(flushed, 5)
    assert [e.envelope.data["message"] for e in await store.read("run", "run-1")] == ["before the record",
                                                                                    "after the record"]
    assert kv.values
    assert kv.gets == 0


async def test_writes_of_one_identity_land_in_the_order_they_were_made() -> None:
    kv = GatedKv()
    steps = StepStore(kv, "run-1")  # type: ignore[arg-type]
    steps.start_empty()
    steps.put_soon("n:s:-", record("started"))
    later = asyncio.create_task(steps.put("n:s:-", record("completed")))
    await settle_loop()
    assert len(kv.waiting) == 1  # the second write waits for the first one to land
    kv.release()
    await settle_loop()
    kv.release()
    await asyncio.wait_for(later, 5)
    [value] = kv.values.values()
    assert StepRecord.model_validate_json(value).status == "completed"
    assert steps.pending() == []


async def test_a_run_that_did_not_start_fresh_reads_its_records_from_kv() -> None:
    kv = GatedKv()
    steps = StepStore(kv, "run-1")  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="must not read KV"):
        await steps.get("n:s:-")
    steps.start_empty()
    assert await steps.get("n:s:-") is None


def test_runs_share_one_compiled_graph_per_checkpointer() -> None:
    saver, other = InMemorySaver(), InMemorySaver()
    first, second = build_graph(object(), saver), build_graph(object(), saver)  # type: ignore[arg-type]
    assert first.graph is second.graph
    assert first.machine is not second.machine
    assert build_graph(object(), other).graph is not first.graph  # type: ignore[arg-type]


async def test_a_frame_whose_cancellation_was_dropped_stops_at_its_next_flush() -> None:
    """Python 3.11's ``wait_for`` (inside every nats-py request) can swallow a cancellation; an aborted frame must
    still stop before its next effect outside the run, which it always precedes with a flush."""
    w = writer(MemoryEventStore())
    calls: list[str] = []

    async def frame() -> None:
        current = asyncio.current_task()
        assert current is not None
        current.cancel()  # the abort arrives ...
        with contextlib.suppress(asyncio.CancelledError):  # ... and a library drops it, as wait_for does when
            await asyncio.sleep(0)  # its inner future is already done
        await w.emit_soon(log_event("step_started"))
        await w.flush()
        calls.append("agent called")

    task = asyncio.create_task(frame())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == []


def test_a_run_keeps_its_checkpoint_lane_and_runs_spread_over_the_lanes() -> None:
    """The official saver serialises its calls with one lock: a replica spreads its runs over several savers."""
    from langorch_infra.settings import RuntimeSettings
    from langorch_runtime.service import SAVER_LANES, RuntimeService

    service = RuntimeService(RuntimeSettings())
    service.savers = [InMemorySaver() for _ in range(SAVER_LANES)]  # type: ignore[misc,assignment]
    runs = [f"run-{i}" for i in range(64)]
    assert all(service.saver_for(r) is service.saver_for(r) for r in runs)
    assert len({id(service.saver_for(r)) for r in runs}) > SAVER_LANES // 2
