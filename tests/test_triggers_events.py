"""Event triggers (api.md §10.4): messages external systems publish under ``lo.ext.>`` start runs of the
registrations whose ``event_source`` matches, over the real stack (NATS JetStream, PostgreSQL, the runtime running
the runs). The subject matcher and the fire ids derived from a message are unit-tested first.

The tests of one module share a NATS account, so each uses subjects of its own (``lo.ext.<test>.…``); the one
registration on ``lo.ext.>`` is removed before its test ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ckp_core.commands import FireTrigger
from ckp_core.events import Actor, EventEnvelope
from ckp_core.ids import new_id
from ckp_core.subjects import subject_matches
from ckp_core.triggers import TriggerState, trigger_id
from ckp_core.webhook_signing import event_dedupe_key
from langorch_infra.bus import ACK, nak
from langorch_infra.jetstream import connect
from langorch_infra.settings import TriggersSettings
from langorch_triggers.events import (
    CONSUMER,
    EventConsumer,
    backoff_s,
    fire_command_id,
    fire_run_id,
    matching,
    message_key,
)
from langorch_triggers.metrics import TriggersMetrics
from langorch_triggers.service import TriggersService
from tests.helpers import Platform, pending_approval, platform_of, procedure_doc, start_run, wait_status, wait_until
from tests.test_approvals_end_to_end import procedure as approval_procedure

integration = pytest.mark.integration
unit = pytest.mark.unit


# -- unit: matching and ids -----------------------------------------------------------------------------------------


@unit
@pytest.mark.parametrize(("pattern", "subject", "expected"), [
    ("lo.ext.orders.created", "lo.ext.orders.created", True),
    ("lo.ext.orders.created", "lo.ext.orders.updated", False),
    ("lo.ext.orders.*", "lo.ext.orders.created", True),
    ("lo.ext.orders.*", "lo.ext.orders.eu.created", False),
    ("lo.ext.orders.*", "lo.ext.orders", False),
    ("lo.ext.*.created", "lo.ext.orders.created", True),
    ("lo.ext.>", "lo.ext.orders.eu.created", True),
    ("lo.ext.>", "lo.ext", False),
    ("lo.ext.orders.>", "lo.ext.orders", False),
    ("lo.ext.orders.created", "lo.ext.orders.created.late", False),
])
def test_subject_patterns_match_as_nats_does(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


def registration(tid: str, source: str | None) -> TriggerState:
    return TriggerState(tid, exists=True, procedure_id=tid.split("@")[0], version="1",
                        config={"trigger_type": "event", "event_source": source, "enabled": True})


@unit
def test_only_registrations_whose_source_matches_fire_in_trigger_id_order() -> None:
    states = [registration("z@1", "nats://lo.ext.>"), registration("b@1", "nats://lo.ext.orders.*"),
              registration("a@1", "nats://lo.ext.orders.created"), registration("c@1", "nats://lo.ext.invoices.*"),
              registration("d@1", "kafka://orders"), registration("e@1", None)]
    assert [s.trigger_id for s in matching(states, "lo.ext.orders.created")] == ["a@1", "b@1", "z@1"]
    assert [s.trigger_id for s in matching(states, "lo.ext.invoices.paid")] == ["c@1", "z@1"]
    assert matching(states[1:], "lo.ext.shipments.sent") == []


@unit
def test_a_message_s_fire_ids_are_the_same_on_every_delivery_and_differ_per_trigger_and_attempt() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    msg: Any = SimpleNamespace(metadata=SimpleNamespace(sequence=SimpleNamespace(stream=41), timestamp=at))
    key = message_key(msg)
    assert key == message_key(msg) == f"41:{at.isoformat()}"
    assert fire_run_id(key, "a@1") == fire_run_id(key, "a@1") != fire_run_id(key, "b@1")
    assert fire_run_id("42:" + at.isoformat(), "a@1") != fire_run_id(key, "a@1")
    attempts = {fire_command_id(key, "a@1", n) for n in range(3)}
    assert len(attempts) == 3
    assert fire_run_id(key, "a@1") not in attempts
    assert fire_command_id(key, "a@1", 1) == fire_command_id(key, "a@1", 1)
    assert [backoff_s(n) for n in (1, 2, 3, 7, 50)] == [1.0, 2.0, 4.0, 60.0, 60.0]


class FakeMsg:
    """What the consumer reads of a delivered message, and what it was settled with."""

    def __init__(self, subject: str, data: bytes, deliveries: int = 1, headers: dict[str, str] | None = None):
        self.subject, self.data, self.headers = subject, data, headers
        self.metadata = SimpleNamespace(sequence=SimpleNamespace(stream=7), num_delivered=deliveries,
                                        timestamp=datetime(2026, 1, 2, tzinfo=UTC))

    async def in_progress(self) -> None:
        pass


def consumer_of(states: list[TriggerState], fire: Any, history: list[Any] | None = None) -> EventConsumer:
    """An :class:`EventConsumer` over a stand-in service: its registry holds ``states`` and ``fire`` decides."""
    service: Any = SimpleNamespace(
        metrics=TriggersMetrics(), settings=SimpleNamespace(concurrency_retry_after_s=5),
        registry=SimpleNamespace(live=lambda trigger_type: states, project_of=lambda pid, version: "proj",
                                 listeners=[]),
        handler=SimpleNamespace(load=lambda tid, cmd: _async(SimpleNamespace(done=[
            e for e in history or [] if e.envelope.causation_id == cmd.command_id]))), fire=fire)
    return EventConsumer(service)


async def _async(value: Any) -> Any:
    return value


def outcome(event_type: str, **data: Any) -> EventEnvelope:
    return EventEnvelope(type=event_type, aggregate="trigger", aggregate_id="x@1", seq=1,
                         actor=Actor.system("triggers"), data=data)


@unit
async def test_a_message_is_acked_once_decided_and_nakked_at_the_limit_or_on_a_failure() -> None:
    states = [registration("a@1", "nats://lo.ext.orders.*"), registration("b@1", "nats://lo.ext.>")]
    commands: list[FireTrigger] = []

    async def fired(cmd: FireTrigger) -> EventEnvelope:
        commands.append(cmd)
        return outcome("trigger_fired", run_id=cmd.run_id)

    consumer = consumer_of(states, fired)
    assert await consumer.handle(FakeMsg("lo.ext.orders.created", b'{"id": 1}')) == ACK  # type: ignore[arg-type]
    assert [(c.procedure_id, c.trigger_type, c.triggered_by, c.project_id) for c in commands] == [
        ("a", "event", "event:lo.ext.orders.created", "proj"), ("b", "event", "event:lo.ext.orders.created", "proj")]
    assert commands[0].input_vars["event_payload"] == {"id": 1}
    assert commands[0].dedupe_key == event_dedupe_key(b'{"id": 1}', {})
    assert await consumer.handle(FakeMsg("lo.ext.invoices.paid", b"{}")) == ACK  # type: ignore[arg-type]
    assert len(commands) == 3  # only b@1 matched
    assert await consumer_of([], fired).handle(FakeMsg("lo.ext.x", b"{}")) == ACK  # type: ignore[arg-type]

    async def throttled(cmd: FireTrigger) -> EventEnvelope:
        if cmd.procedure_id == "a":
            return outcome("trigger_fired", run_id=cmd.run_id)
        return outcome("trigger_fire_skipped", outcome="throttled", extra={"retry_after_s": 9})

    assert await consumer_of(states, throttled).handle(
        FakeMsg("lo.ext.orders.created", b"{}")) == nak(9.0)  # type: ignore[arg-type]

    async def broken(cmd: FireTrigger) -> EventEnvelope:
        raise TimeoutError("the runtime did not answer")

    assert await consumer_of(states, broken).handle(
        FakeMsg("lo.ext.orders.created", b"{}", deliveries=3)) == nak(4.0)  # type: ignore[arg-type]


@unit
async def test_a_redelivery_after_refusals_at_the_limit_is_the_next_attempt_with_the_same_run() -> None:
    msg = FakeMsg("lo.ext.orders.created", b"{}", deliveries=3)
    key = message_key(msg)  # type: ignore[arg-type]
    refusals = [SimpleNamespace(envelope=outcome("trigger_fire_skipped", outcome="throttled").model_copy(
        update={"causation_id": fire_command_id(key, "a@1", n)})) for n in range(2)]
    commands: list[FireTrigger] = []

    async def fired(cmd: FireTrigger) -> EventEnvelope:
        commands.append(cmd)
        return outcome("trigger_fired", run_id=cmd.run_id)

    consumer = consumer_of([registration("a@1", "nats://lo.ext.orders.created")], fired, refusals)
    assert await consumer.handle(msg) == ACK  # type: ignore[arg-type]
    [cmd] = commands
    assert (cmd.command_id, cmd.run_id) == (fire_command_id(key, "a@1", 2), fire_run_id(key, "a@1"))
    assert cmd.source_detail["attempt"] == 2


# -- the real stack -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, agents=False, triggers=True) as p:
        yield p


@pytest.fixture(scope="module")
async def producer(module_nats_url: str) -> AsyncIterator[JetStreamContext]:
    """An external system's connection, publishing to ``lo.ext.>``."""
    nc: NATS = await connect(module_nats_url, "test-event-producer")
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def topic() -> str:
    """Subjects of one test: ``lo.ext.<unique token>``."""
    return f"lo.ext.t{new_id().replace('-', '')[-12:]}"


async def event_procedure(p: Platform, source: str, *, doc: dict[str, Any] | None = None, activate: bool = True,
                          register: bool = True, **config: Any) -> str:
    """Import a procedure (``doc`` or a greeting), activate it and register an event trigger on ``source`` (or,
    ``register=False``, leave that to the document's own trigger block); returns the procedure id once the
    triggers service's registry knows the registration (live unless disabled or dormant)."""
    c = p.client
    pid = f"evt_{new_id().replace('-', '')[-12:]}"
    doc = dict(doc or procedure_doc(pid, "1"), procedure_id=pid)
    version = str(doc["version"])
    assert (await c.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
    if activate:
        r = await c.patch(f"/api/procedures/{pid}/{version}/status", json={"status": "active"})
        assert r.status_code == 200, r.text
    if register:
        r = await c.post(f"/api/triggers/{pid}/{version}", json={"trigger_type": "event",
                                                                  "event_source": f"nats://{source}", **config})
        assert r.status_code == 201, r.text
    registry = p.triggers_service.registry
    tid = trigger_id(pid, version)
    live = activate and config.get("enabled", True)
    await wait_until(lambda: registry.is_live(tid) if live else (
        tid in registry.triggers and registry.status_of(pid, version) is not None))
    return pid


async def fires(p: Platform, pid: str, outcome: str | None = None) -> list[dict[str, Any]]:
    r = await p.client.get(f"/api/triggers/{pid}/1/fires", params={"outcome": outcome} if outcome else {})
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def started(p: Platform, pid: str, count: int = 1, timeout: float = 60) -> list[dict[str, Any]]:
    """The ``started`` fires of ``pid`` once there are ``count`` of them."""
    return await wait_until(lambda: fires(p, pid, "started"), lambda items: len(items) >= count, timeout)


async def acked(p: Platform, sequence: int, timeout: float = 60) -> None:
    """Wait until the event consumer acked every ``LO_EXT`` message up to ``sequence``."""
    js = p.triggers_service.js

    async def floor() -> int:
        info = await js.consumer_info(CONSUMER.stream, CONSUMER.durable)
        return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0

    await wait_until(floor, lambda seq: seq >= sequence, timeout)


def counted(p: Platform, result: str) -> float:
    return counted_in(p.triggers_service, result)


def counted_in(service: TriggersService, result: str) -> float:
    value = service.metrics.registry.get_sample_value("langorch_trigger_events_total", {"result": result})
    return float(value or 0.0)


@integration
async def test_a_message_starts_a_run_whose_inputs_carry_its_payload_and_headers(
        platform: Platform, producer: JetStreamContext) -> None:
    c = platform.client
    pid = await event_procedure(platform, "lo.ext.orders.created")
    matched = counted(platform, "matched")
    payload = b'{"order_id": "A-17", "amount": 120.5}'
    ack = await producer.publish("lo.ext.orders.created", payload,
                                 headers={"Nats-Msg-Id": "order-A-17", "X-Source": "erp"})
    again = await producer.publish("lo.ext.orders.created", payload,
                                   headers={"Nats-Msg-Id": "order-A-17", "X-Source": "erp"})
    assert again.duplicate
    assert again.seq == ack.seq

    [fire] = await started(platform, pid)
    assert fire["trigger_type"] == "event"
    assert fire["triggered_by"] == "event:lo.ext.orders.created"
    assert fire["source_detail"] == {"subject": "lo.ext.orders.created", "stream_sequence": ack.seq,
                                     "event_message_id": "order-A-17", "attempt": 0}
    run = await wait_status(c, fire["run_id"], ("completed",), timeout=60)
    assert run["trigger_type"] == "event"
    inputs = run["input_vars"]
    assert inputs["event_source"] == "nats://lo.ext.orders.created"
    assert inputs["event_message_id"] == "order-A-17"
    assert inputs["event_payload"] == {"order_id": "A-17", "amount": 120.5}
    assert inputs["event_attributes"] == {"Nats-Msg-Id": "order-A-17", "X-Source": "erp"}
    assert inputs["greeting"] == "hello e2e"  # the document's default is kept

    await acked(platform, ack.seq)
    assert len(await fires(platform, pid)) == 1
    assert counted(platform, "matched") >= matched + 1


@integration
async def test_a_message_handled_again_finds_its_fire_instead_of_starting_a_second_run(
        platform: Platform, producer: JetStreamContext) -> None:
    """As after a crash between the fire and the ack: the same stored message is the same fire."""
    subject = f"{topic()}.again"
    pid = await event_procedure(platform, subject)
    ack = await producer.publish(subject, b'{"n": 1}')
    [fire] = await started(platform, pid)
    await acked(platform, ack.seq)

    reader = await producer.pull_subscribe(subject, stream=CONSUMER.stream)  # the same message, delivered again
    try:
        [msg] = await reader.fetch(1, timeout=10)
    finally:
        await reader.unsubscribe()
    assert msg.metadata.sequence.stream == ack.seq
    state = platform.triggers_service.registry.triggers[trigger_id(pid, "1")]
    again = await platform.triggers_service.events.fire(msg, state)
    assert (again.type, again.data["run_id"]) == ("trigger_fired", fire["run_id"])
    assert [f["run_id"] for f in await fires(platform, pid)] == [fire["run_id"]]
    runs = (await platform.client.get("/api/runs", params={"procedure_id": pid})).json()
    assert [r["run_id"] for r in runs["items"]] == [fire["run_id"]]


@integration
async def test_two_replicas_share_the_consumer_and_each_message_starts_one_run(
        platform: Platform, producer: JetStreamContext) -> None:
    subject = f"{topic()}.shared"
    pid = await event_procedure(platform, subject)
    second = TriggersService(TriggersSettings(nats_url=platform.nats_url, database_url=platform.database_url,
                                              instance_id=f"second-{pid}"))
    await second.start()
    task = asyncio.create_task(second.run())
    try:
        await wait_until(lambda: second.registry.is_live(trigger_id(pid, "1")))
        matched = counted(platform, "matched") + counted_in(second, "matched")
        acks = [await producer.publish(subject, json.dumps({"n": n}).encode()) for n in range(12)]
        items = await started(platform, pid, len(acks))
        await acked(platform, acks[-1].seq)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await second.stop()
    assert sorted(i["source_detail"]["stream_sequence"] for i in items) == [a.seq for a in acks]
    assert len({i["run_id"] for i in items}) == len(acks)
    assert counted(platform, "matched") + counted_in(second, "matched") >= matched + len(acks)


@integration
async def test_a_document_s_event_filter_decides_which_messages_fire(
        platform: Platform, producer: JetStreamContext) -> None:
    subject = f"{topic()}.orders"
    doc = procedure_doc("x", "1", trigger={
        "type": "event", "event_source": f"nats://{subject}",
        "event_filter": "event_payload.total >= 1000 and event_attributes.region == 'eu'"})
    pid = await event_procedure(platform, subject, doc=doc, register=False)
    filtered = counted(platform, "filtered")
    small = await producer.publish(subject, b'{"total": 5}', headers={"region": "eu"})
    elsewhere = await producer.publish(subject, b'{"total": 5000}', headers={"region": "us"})
    big = await producer.publish(subject, b'{"total": 5000}', headers={"region": "eu"})
    await acked(platform, big.seq)
    [fire] = await started(platform, pid)
    assert fire["source_detail"]["stream_sequence"] == big.seq
    assert counted(platform, "filtered") >= filtered + 2
    assert len(await fires(platform, pid)) == 1  # a filtered message leaves no row
    assert {small.seq, elsewhere.seq}.isdisjoint({f["source_detail"]["stream_sequence"]
                                                  for f in await fires(platform, pid)})


@integration
async def test_a_payload_that_is_not_json_arrives_as_raw_body_and_other_json_as_value(
        platform: Platform, producer: JetStreamContext) -> None:
    subject = f"{topic()}.note"
    pid = await event_procedure(platform, subject, input_vars={"greeting": "static"})
    await producer.publish(subject, b"plain text, not JSON")
    await producer.publish(subject, b"[1, 2, 3]")
    runs = [await wait_status(platform.client, f["run_id"], ("completed",), timeout=60)
            for f in await started(platform, pid, 2)]
    payloads = sorted((r["input_vars"]["event_payload"] for r in runs), key=str)
    assert payloads == [{"raw_body": "plain text, not JSON"}, {"value": [1, 2, 3]}]
    for run in runs:
        assert run["input_vars"]["greeting"] == "static"  # the registration's static inputs
        assert run["input_vars"]["event_message_id"].startswith("LO_EXT:")  # no Nats-Msg-Id: the stream sequence
        assert run["input_vars"]["event_attributes"] == {}


@integration
async def test_with_dedupe_on_the_same_payload_twice_starts_one_run_and_records_a_duplicate(
        platform: Platform, producer: JetStreamContext) -> None:
    """Without a ``Nats-Msg-Id`` JetStream keeps both messages; the dedupe key is then the payload's hash."""
    subject = f"{topic()}.paid"
    pid = await event_procedure(platform, subject, dedupe_window_seconds=600)
    first = await producer.publish(subject, b'{"invoice": 9}')
    second = await producer.publish(subject, b'{"invoice": 9}')
    assert second.seq > first.seq
    await acked(platform, second.seq)
    [fire] = await started(platform, pid)
    [duplicate] = await wait_until(lambda: fires(platform, pid, "duplicate"), lambda items: len(items) == 1)
    assert (duplicate["reason"], duplicate["run_id"]) == ("duplicate_delivery", fire["run_id"])
    assert duplicate["source_detail"]["stream_sequence"] == second.seq
    runs = (await platform.client.get("/api/runs", params={"procedure_id": pid})).json()
    assert [r["run_id"] for r in runs["items"]] == [fire["run_id"]]


@integration
async def test_wildcard_sources_match_one_token_or_the_rest(platform: Platform, producer: JetStreamContext) -> None:
    base = topic()
    one_token = await event_procedure(platform, f"{base}.orders.*")
    everything = await event_procedure(platform, "lo.ext.>")
    try:
        created = await producer.publish(f"{base}.orders.created", b'{"n": 1}')
        nested = await producer.publish(f"{base}.orders.eu.created", b'{"n": 2}')
        await acked(platform, nested.seq)
        [fire] = await started(platform, one_token)
        assert fire["source_detail"]["stream_sequence"] == created.seq
        caught = await wait_until(lambda: fires(platform, everything, "started"),
                                  lambda items: {created.seq, nested.seq} <= {
                                      i["source_detail"]["stream_sequence"] for i in items})
        runs = {i["source_detail"]["stream_sequence"]: i["run_id"] for i in caught}
        assert runs[created.seq] != fire["run_id"]  # one run per matching registration
        nested_run = await wait_status(platform.client, runs[nested.seq], ("completed",), timeout=60)
        assert nested_run["input_vars"]["event_source"] == f"nats://{base}.orders.eu.created"
        assert len(await fires(platform, one_token)) == 1
    finally:  # the catch-all must not fire for the other tests' messages
        assert (await platform.client.delete(f"/api/triggers/{everything}/1")).status_code == 204
        await wait_until(lambda: not platform.triggers_service.registry.is_live(trigger_id(everything, "1")))


@integration
async def test_a_disabled_or_dormant_registration_does_not_fire_and_the_message_is_acked(
        platform: Platform, producer: JetStreamContext) -> None:
    subject = f"{topic()}.quiet"
    disabled = await event_procedure(platform, subject, enabled=False)
    dormant = await event_procedure(platform, subject, activate=False)
    unmatched = counted(platform, "unmatched")
    ack = await producer.publish(subject, b'{"n": 1}')
    await acked(platform, ack.seq)
    assert counted(platform, "unmatched") >= unmatched + 1
    assert await fires(platform, disabled) == []
    assert await fires(platform, dormant) == []

    assert (await platform.client.post(f"/api/triggers/{disabled}/1/enable")).status_code == 200
    await wait_until(lambda: platform.triggers_service.registry.is_live(trigger_id(disabled, "1")))
    later = await producer.publish(subject, b'{"n": 2}')
    [fire] = await started(platform, disabled)
    assert fire["source_detail"]["stream_sequence"] == later.seq  # the acked message is not fired again
    await acked(platform, later.seq)
    assert await fires(platform, dormant) == []


@integration
async def test_inputs_the_procedure_refuses_are_recorded_as_invalid_and_the_message_acked(
        platform: Platform, producer: JetStreamContext) -> None:
    subject = f"{topic()}.typed"
    doc = procedure_doc("x", "1", variables_schema={"greeting": {"type": "string", "default": "hi"},
                                                        "event_payload": {"type": "number"}})
    pid = await event_procedure(platform, subject, doc=doc)
    ack = await producer.publish(subject, b'{"not": "a number"}')
    await acked(platform, ack.seq)
    [invalid] = await wait_until(lambda: fires(platform, pid, "invalid"), lambda items: len(items) == 1)
    assert (invalid["reason"], invalid["run_id"]) == ("invalid_input_vars", None)
    assert await fires(platform, pid, "started") == []


@integration
async def test_at_the_concurrency_limit_the_message_is_redelivered_and_starts_its_run_once_a_slot_is_free(
        platform: Platform, producer: JetStreamContext) -> None:
    c = platform.client
    subject = f"{topic()}.refund"
    doc = approval_procedure("x", {"on_approve": "approved_end", "on_reject": "rejected_end"}, "approved_end",
                             "rejected_end")
    pid = await event_procedure(platform, subject, doc=doc, max_concurrent_runs=1)
    active = await start_run(c, pid)
    await pending_approval(c, active)
    await wait_until(lambda: platform.triggers_service.slots.held(pid), lambda runs: set(runs) == {active})

    ack = await producer.publish(subject, b'{"amount": 7}', headers={"Nats-Msg-Id": f"refund-{pid}"})
    [throttled] = await wait_until(lambda: fires(platform, pid, "throttled"), lambda items: len(items) >= 1)
    assert (throttled["reason"], throttled["run_id"]) == ("max_concurrent_runs", None)
    assert throttled["source_detail"]["attempt"] == 0
    assert await fires(platform, pid, "started") == []
    assert await platform.triggers_service.events.backlog_age() > 0  # the message waits for its redelivery

    assert (await c.post(f"/api/runs/{active}/cancel", json={})).status_code in (200, 202)
    await wait_status(c, active, ("canceled",))
    [fire] = await started(platform, pid, timeout=90)
    assert fire["source_detail"]["stream_sequence"] == ack.seq
    assert fire["source_detail"]["attempt"] >= 1  # a later delivery, after the recorded refusal(s)
    await pending_approval(c, fire["run_id"])
    run = (await c.get(f"/api/runs/{fire['run_id']}")).json()
    assert run["input_vars"]["event_payload"] == {"amount": 7}
    await acked(platform, ack.seq)
    assert len(await fires(platform, pid, "started")) == 1
    await wait_until(platform.triggers_service.events.backlog_age, lambda age: age == 0)
    assert (await c.post(f"/api/runs/{fire['run_id']}/cancel", json={})).status_code in (200, 202)
    await wait_status(c, fire["run_id"], ("canceled",))
