"""The one command-handler mechanism (``langorch_infra.handling``) on the in-memory event store: a decision is
appended with the aggregate's expected position and audited once; a refusal is a ``command_rejected`` event;
a concurrency conflict is decided again on the re-read aggregate (bounded, jittered backoff, then raised for
redelivery); a redelivered command changes nothing and is audited again under the same record id."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from ckp_core.audit import AuditEntry
from ckp_core.commands import DeleteRun, StartRun
from ckp_core.errors import CommandRefused, ConcurrencyError
from ckp_core.events import ANONYMOUS, Actor, EventData, Log, RunCreated, make_event
from ckp_core.eventstore import MemoryEventStore, StoredEvent
from langorch_infra.handling import BACKOFF_CAP_S, AggregateCache, CommandHandler, Handled

pytestmark = pytest.mark.unit

RUNTIME = Actor.system("runtime")


class RecordedAudit:
    """An audit sink keeping the records it is given, as ``LO_AUDIT`` would (deduplication aside)."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    async def write(self, entry: AuditEntry) -> bool:
        self.entries.append(entry)
        return True


@dataclass
class Tally:
    """A tiny aggregate: how many ``log`` events it has and the ids of the commands that caused them."""

    tally_id: str
    count: int = 0
    causes: list[str | None] = field(default_factory=list)


def fold_tally(tally_id: str, events: Sequence[StoredEvent]) -> Tally:
    state = Tally(tally_id)
    for stored in events:
        if stored.envelope.type == "log":
            state.count += 1
            state.causes.append(stored.envelope.causation_id)
    return state


def log_line(text: str) -> Log:
    return Log(level="info", message=text)


class Bump(StartRun):
    """A command addressed to the tally (its ``run_id`` is the aggregate id)."""


def handler(store: MemoryEventStore, audit: RecordedAudit | None = None, **kwargs: object) -> CommandHandler[Tally]:
    return CommandHandler(store, "run", fold_tally, audit=audit, rng=random.Random(7), **kwargs)  # type: ignore[arg-type]


async def competing_append(store: MemoryEventStore, aggregate_id: str, text: str) -> None:
    """Another writer of the aggregate lands (appends at its current head)."""
    head = await store.head("run", aggregate_id)
    event = make_event(log_line(text), aggregate_id=aggregate_id, seq=(head.seq if head else 0) + 1, actor=RUNTIME,
                       aggregate="run")
    await store.append([event], expected_position=head.position if head else 0)


async def test_a_decision_is_appended_at_the_expected_position_and_audited_once() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    await competing_append(store, "t1", "before")
    command = Bump(actor=ANONYMOUS, causation_id="req-1", run_id="t1")
    seen: list[Tally] = []

    def decide(state: Tally) -> EventData:
        seen.append(state)
        return log_line(f"bump {state.count + 1}")

    handled = await handler(store, audit).handle("t1", command, decide, command_type="bump", correlation_id="t1")
    assert seen[0].count == 1  # decided on the folded state
    assert handled.accepted
    assert not handled.replayed
    assert handled.attempts == 1
    [event] = handled.events
    assert (event.type, event.seq, event.causation_id, event.correlation_id) == ("log", 2, command.command_id, "t1")
    assert event.actor == ANONYMOUS  # the command's actor unless the owner names another
    stored = await store.read("run", "t1")
    assert [e.envelope.event_id for e in stored][-1] == event.event_id
    assert handled.position == stored[-1].position == handled.positions[0]
    [record] = audit.entries
    assert (record.category, record.action, record.outcome) == ("run", "start", "accepted")
    assert (record.event_id, record.command_id, record.request_id) == (command.command_id, command.command_id,
                                                                       "req-1")
    assert record.correlation_id == "t1"


async def test_a_refusal_is_a_command_rejected_event_with_its_code_and_extension_members() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    command = Bump(actor=ANONYMOUS, run_id="t2")

    def decide(state: Tally) -> EventData:
        raise CommandRefused("procedure_not_runnable", "version 1 is archived", status="archived")

    handled = await handler(store, audit).handle("t2", command, decide, command_type="bump")
    assert handled.rejected
    assert handled.refusal is not None
    assert handled.refusal.code == "procedure_not_runnable"
    [event] = handled.events
    assert event.type == "command_rejected"
    assert event.aggregate == "run"
    assert event.seq == 1
    assert event.data == {"command_id": command.command_id, "command_type": "bump", "code": "procedure_not_runnable",
                          "detail": "version 1 is archived", "extra": {"status": "archived"}}
    assert [e.envelope.type for e in await store.read("run", "t2")] == ["command_rejected"]
    [record] = audit.entries
    assert (record.outcome, record.meta["code"]) == ("rejected", "procedure_not_runnable")
    assert "version 1 is archived" in record.description


async def test_a_refusal_kept_out_of_the_stream_is_only_a_rejected_record() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    await competing_append(store, "t3", "existing")

    def decide(state: Tally) -> EventData:
        raise CommandRefused("invalid_run_transition", "a completed run cannot be canceled")

    handled = await handler(store, audit).handle("t3", Bump(actor=ANONYMOUS, run_id="t3"), decide,
                                                 command_type="bump", refusals="audit")
    assert handled.rejected
    assert handled.events == ()
    assert len(await store.read("run", "t3")) == 1
    [record] = audit.entries
    assert (record.outcome, record.meta["code"]) == ("rejected", "invalid_run_transition")


async def test_an_accepted_no_op_appends_nothing_and_says_so_in_its_record() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    handled = await handler(store, audit).handle("t4", Bump(actor=ANONYMOUS, run_id="t4"), lambda s: None,
                                                 command_type="bump")
    assert handled.accepted
    assert handled.events == ()
    assert handled.position == 0
    assert await store.read("run", "t4") == []
    [record] = audit.entries
    assert (record.outcome, record.meta["noop"]) == ("accepted", True)


async def test_a_concurrency_conflict_is_decided_again_on_the_reread_aggregate() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    naps: list[float] = []

    async def nap(seconds: float) -> None:
        naps.append(seconds)

    decisions: list[int] = []

    async def decide(state: Tally) -> EventData:
        decisions.append(state.count)
        if len(decisions) == 1:  # another writer lands between this load and the append
            await competing_append(store, "t5", "racer")
        return log_line(f"after {state.count}")

    command = Bump(actor=ANONYMOUS, run_id="t5")
    handled = await handler(store, audit, sleep=nap).handle("t5", command, decide, command_type="bump")
    assert decisions == [0, 1]  # the second decision saw the racer's event
    assert handled.attempts == 2
    assert handled.state.count == 1
    assert [e.envelope.data.get("message") for e in await store.read("run", "t5")] == ["racer", "after 1"]
    assert [e.envelope.causation_id for e in await store.read("run", "t5")][-1] == command.command_id
    assert len(naps) == 1
    assert 0.005 <= naps[0] <= 0.015
    assert len(audit.entries) == 1  # the lost attempt is not audited


async def test_a_conflict_that_persists_is_raised_for_redelivery_after_bounded_attempts() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    naps: list[float] = []

    async def nap(seconds: float) -> None:
        naps.append(seconds)

    async def decide(state: Tally) -> EventData:
        await competing_append(store, "t6", f"racer {state.count}")  # every time, someone else lands first
        return log_line("mine")

    with pytest.raises(ConcurrencyError):
        await handler(store, audit, sleep=nap, max_attempts=5).handle(
            "t6", Bump(actor=ANONYMOUS, run_id="t6"), decide, command_type="bump")
    events = await store.read("run", "t6")
    assert [e.envelope.data.get("message") for e in events] == [f"racer {i}" for i in range(5)]
    assert len(naps) == 4  # a pause between attempts, none after the last
    assert all(0 < n <= BACKOFF_CAP_S * 1.5 for n in naps)
    assert naps[3] > naps[0]  # exponential (jitter cannot undo a factor of 8)
    assert audit.entries == []  # nothing was decided: the redelivery will audit its outcome


async def test_a_redelivered_command_changes_nothing_and_is_audited_again_under_the_same_record() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    command = Bump(actor=ANONYMOUS, run_id="t7")
    calls: list[int] = []

    def decide(state: Tally) -> EventData:
        calls.append(state.count)
        return log_line("once")

    h = handler(store, audit)
    first = await h.handle("t7", command, decide, command_type="bump")
    again = await h.handle("t7", Bump.model_validate_json(command.model_dump_json()), decide, command_type="bump")
    assert calls == [0]  # the redelivery did not decide again
    assert again.replayed
    assert again.events == first.events
    assert again.positions == first.positions
    assert len(await store.read("run", "t7")) == 1
    assert [e.msg_id for e in audit.entries] == [f"audit:{command.command_id}"] * 2  # deduplicated by NATS
    assert [e.event_id for e in audit.entries] == [command.command_id] * 2  # and by the projection


async def test_a_redelivered_refusal_is_not_appended_twice() -> None:
    store = MemoryEventStore()
    command = Bump(actor=ANONYMOUS, run_id="t8")

    def refuse(state: Tally) -> EventData:
        raise CommandRefused("invalid_input_vars", "1 input variable failed validation",
                             errors={"input_vars.n": ["Required"]})

    h = handler(store)
    await h.handle("t8", command, refuse, command_type="bump")
    again = await h.handle("t8", command, refuse, command_type="bump")
    assert again.replayed
    assert again.rejected
    assert [e.envelope.type for e in await store.read("run", "t8")] == ["command_rejected"]


async def test_several_events_an_owner_actor_a_computed_correlation_and_another_record() -> None:
    store, audit = MemoryEventStore(), RecordedAudit()
    command = Bump(actor=ANONYMOUS, causation_id="req-9", run_id="t9")
    record_as = DeleteRun(command_id=command.command_id, actor=ANONYMOUS, causation_id="req-9", run_id="t9")

    def decide(state: Tally) -> list[EventData]:
        return [log_line("one"), log_line("two")]

    handled: Handled[Tally] = await handler(store, audit).handle(
        "t9", command, decide, command_type="bump", actor=RUNTIME, correlation_id=lambda s: f"{s.tally_id}-corr",
        audit_as=record_as, audit_meta={"extra_meta": {"procedure_id": "p"}, "sensitive_keys": ["message"]})
    assert [e.seq for e in handled.events] == [1, 2]
    assert {e.actor for e in handled.events} == {RUNTIME}
    assert {e.correlation_id for e in handled.events} == {"t9-corr"}
    assert handled.position == handled.positions[1] > handled.positions[0]
    [record] = audit.entries
    assert (record.category, record.action, record.command_id) == ("run", "delete", command.command_id)
    assert record.meta["procedure_id"] == "p"


async def test_typed_run_created_of_a_new_aggregate_lands_at_position_zero_once() -> None:
    """Two commands creating the same aggregate: one lands at expected position 0, the other is decided again
    on the created aggregate (and refused there by the owner's decision)."""
    store = MemoryEventStore()
    h = handler(store)

    async def create(state: Tally) -> EventData:
        if state.count or await store.read("run", "t10"):
            raise CommandRefused("run_exists", "run t10 exists")
        return RunCreated(procedure_id="p", procedure_version="1", root_run_id="t10")

    async def racing_create(state: Tally) -> EventData:
        if not await store.read("run", "t10"):  # the other create lands between this load and the append
            await h.handle("t10", Bump(actor=ANONYMOUS, run_id="t10"), create, command_type="bump")
        return await create(state)

    handled = await h.handle("t10", Bump(actor=ANONYMOUS, run_id="t10"), racing_create, command_type="bump")
    assert handled.attempts == 2
    assert handled.rejected
    assert [e.envelope.type for e in await store.read("run", "t10")] == ["run_created", "command_rejected"]


def test_the_handler_needs_one_attempt_at_least() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        CommandHandler(MemoryEventStore(), "run", fold_tally, max_attempts=0)



# -- the aggregate cache -------------------------------------------------------------------------------------------


def evolve_tally(state: Tally, stored: StoredEvent) -> None:
    if stored.envelope.type == "log":
        state.count += 1
        state.causes.append(stored.envelope.causation_id)


class CountingStore(MemoryEventStore):
    """The in-memory store, counting the events each read returns."""

    def __init__(self) -> None:
        super().__init__()
        self.events_read = 0

    async def read(self, aggregate: str, aggregate_id: str, after_position: int = 0) -> list[StoredEvent]:
        found = await super().read(aggregate, aggregate_id, after_position)
        self.events_read += len(found)
        return found


def cached_handler(store: MemoryEventStore, cache: AggregateCache[Tally]) -> CommandHandler[Tally]:
    return CommandHandler(store, "run", fold_tally, rng=random.Random(7), cache=cache)


def tally_cache(max_aggregates: int = 10_000) -> AggregateCache[Tally]:
    return AggregateCache(Tally, evolve_tally, max_aggregates=max_aggregates)


def bump(state: Tally) -> EventData:
    return log_line(f"bump {state.count + 1}")


async def test_a_cached_aggregate_reads_only_the_events_appended_since_and_decides_as_the_full_fold() -> None:
    store, cache = CountingStore(), tally_cache()
    commands = [Bump(actor=ANONYMOUS, run_id="t1") for _ in range(50)]
    for command in commands:
        await cached_handler(store, cache).handle("t1", command, bump, command_type="bump")
    # each decision read the one event the previous one appended, not the growing history (50 * 51 / 2 events)
    assert store.events_read == 49
    await competing_append(store, "t1", "another writer")  # not through the handler: read before the next decision
    loaded = await cached_handler(store, cache).load("t1")
    full = await handler(store).load("t1")
    assert (loaded.state, loaded.seq, loaded.position) == (full.state, full.seq, full.position)
    assert loaded.state.count == 51


async def test_a_redelivered_command_is_recognised_from_the_cache() -> None:
    store, cache = MemoryEventStore(), tally_cache()
    command = Bump(actor=ANONYMOUS, run_id="t2")
    first = await cached_handler(store, cache).handle("t2", command, bump, command_type="bump")
    for _ in range(3):
        await cached_handler(store, cache).handle("t2", Bump(actor=ANONYMOUS, run_id="t2"), bump, command_type="bump")
    again = await cached_handler(store, cache).handle("t2", command, bump, command_type="bump")
    assert again.replayed
    assert [e.event_id for e in again.events] == [e.event_id for e in first.events]
    assert len(await store.read("run", "t2")) == 4


async def test_concurrent_decisions_on_a_cached_aggregate_apply_each_event_once() -> None:
    store, cache = MemoryEventStore(), tally_cache()
    await asyncio.gather(*(cached_handler(store, cache).handle("t3", Bump(actor=ANONYMOUS, run_id="t3"), bump,
                                                               command_type="bump") for _ in range(4)))
    loaded = await cached_handler(store, cache).load("t3")
    assert loaded.state.count == len(await store.read("run", "t3")) == 4


async def test_the_decision_gets_a_copy_and_the_least_recently_used_aggregate_is_dropped() -> None:
    store, cache = CountingStore(), tally_cache(max_aggregates=2)
    for aggregate_id in ("a", "b", "c"):
        await cached_handler(store, cache).handle(aggregate_id, Bump(actor=ANONYMOUS, run_id=aggregate_id), bump,
                                                  command_type="bump")
    loaded = await cached_handler(store, cache).load("c")
    loaded.state.count = 99  # a decision scribbling on its state does not change the cache
    assert (await cached_handler(store, cache).load("c")).state.count == 1
    before = store.events_read
    assert (await cached_handler(store, cache).load("a")).state.count == 1  # dropped: read in full again
    assert store.events_read == before + 1


async def test_a_view_reads_the_current_state_and_copies_only_what_it_picks() -> None:
    store, cache = CountingStore(), tally_cache()
    await competing_append(store, "v1", "one")
    assert await cache.view(store, "run", "v1", lambda state: state.count) == 1
    await competing_append(store, "v1", "two")
    causes = await cache.view(store, "run", "v1", lambda state: list(state.causes))
    assert len(causes) == 2
    assert store.events_read == 2
    causes.append("mine")  # the picked copy is the caller's
    assert await cache.view(store, "run", "v1", lambda state: len(state.causes)) == 2
