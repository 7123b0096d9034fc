"""The command consumers on FastStream, in memory: FastStream's ``TestNatsBroker`` delivers each command to the
service's typed handler, which decides against a real in-memory event store (``MemoryEventStore``); the outcome
settles the message (ack, nak when the aggregate moved on, term for a subject nobody takes, nak after a failure)
and is counted in the documented bus metrics; the consumer span continues the trace of the message headers; a
fetch survives a server failover.
The same handlers run against real NATS in the integration tests (test_procedure_lifecycle_api.py,
test_approvals_service.py, test_agents_api.py …)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from faststream.nats import TestNatsBroker
from nats.errors import ConnectionClosedError, ConnectionReconnectingError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from ckp_core.commands import DecideApproval, ImportProcedure, RegisterAgent, RemoveAgent, RequestApproval
from ckp_core.errors import ConcurrencyError
from ckp_core.events import Actor, EventEnvelope
from ckp_core.eventstore import MemoryEventStore
from langorch_approvals.service import ApprovalsService
from langorch_compiler.service import CompilerService
from langorch_infra import bus, messaging, tracing
from langorch_infra.audit import AuditWriter
from langorch_infra.bus import BusMetrics
from langorch_infra.settings import ApprovalsSettings, CompilerSettings, RuntimeSettings
from langorch_runtime.agents import AgentService
from langorch_runtime.creation import CREATE_CONSUMER, CREATE_SUBJECTS, EXECUTE_SUBJECTS, RUN_CONSUMER
from tests.helpers import example

pytestmark = pytest.mark.unit

OPERATOR = Actor(kind="user", id="ops")


def procedure_doc(procedure_id: str, version: str) -> dict[str, Any]:
    """The minimal greeting example under another identity."""
    return {**example("minimal_greeting.ckp.json"), "procedure_id": procedure_id, "version": version}


class RecordedPublishes:
    """The publishing side of a JetStream context, kept in memory: what the audit writer publishes."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.published.append((subject, json.loads(payload), dict(headers or {})))


class MemoryKeyValue:
    """A KV bucket in memory (put and delete), for the compiler's IR entries."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}

    async def put(self, key: str, value: bytes) -> int:
        self.entries[key] = value
        return len(self.entries)

    async def delete(self, key: str) -> bool:
        self.entries.pop(key, None)
        return True


def outcomes(registry: CollectorRegistry, service: str) -> dict[str, float]:
    """``langorch_bus_messages_total`` of ``service`` by outcome."""
    found: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "langorch_bus_messages_total" and sample.labels["service"] == service:
                found[sample.labels["outcome"]] = found.get(sample.labels["outcome"], 0) + sample.value
    return found


def durations(registry: CollectorRegistry, service: str) -> Mapping[str, float]:
    return {s.labels["subject"]: s.value for f in registry.collect() for s in f.samples
            if s.name == "langorch_bus_handler_duration_seconds_count" and s.labels["service"] == service}


def in_memory_compiler() -> tuple[CompilerService, MemoryEventStore, RecordedPublishes, MemoryKeyValue]:
    service = CompilerService(CompilerSettings())
    store, js, kv = MemoryEventStore(), RecordedPublishes(), MemoryKeyValue()
    service.store = store  # type: ignore[assignment]
    service.audit = AuditWriter(js)  # type: ignore[arg-type]
    service.kv = kv  # type: ignore[assignment]
    return service, store, js, kv


async def test_an_import_command_is_decided_audited_and_acked() -> None:
    service, store, js, kv = in_memory_compiler()
    first = ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("inv", "1"))
    again = ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("inv", "1"))
    async with TestNatsBroker(service.broker) as br:
        await br.publish(first.model_dump(mode="json"), "lo.cmd.procedure.import", stream="LO_CMD")
        await br.publish(again.model_dump(mode="json"), "lo.cmd.procedure.import", stream="LO_CMD")
    events = [e.envelope for e in await store.read("procedure", "inv")]
    assert [(e.type, e.seq, e.causation_id) for e in events] == [
        ("procedure_imported", 1, first.command_id), ("command_rejected", 2, again.command_id)]
    assert events[1].data["code"] == "procedure_version_exists"
    assert list(kv.entries) == [events[0].data["ir_key"]]
    assert [(subject, record["outcome"]) for subject, record, _ in js.published] == [
        ("lo.audit.procedure.import", "accepted"), ("lo.audit.procedure.import", "rejected")]
    assert outcomes(service.metrics.registry, "compiler") == {"ack": 2}
    assert durations(service.metrics.registry, "compiler") == {"lo.cmd.procedure.import": 2}


async def test_a_redelivered_command_appends_nothing_more() -> None:
    service, store, js, _ = in_memory_compiler()
    command = ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("inv", "1"))
    async with TestNatsBroker(service.broker) as br:
        for _ in range(2):
            await br.publish(command.model_dump(mode="json"), "lo.cmd.procedure.import", stream="LO_CMD")
    assert [e.envelope.type for e in await store.read("procedure", "inv")] == ["procedure_imported"]
    assert len(js.published) == 2  # the record is published again; JetStream drops the duplicate by Nats-Msg-Id
    assert js.published[0][2]["Nats-Msg-Id"] == js.published[1][2]["Nats-Msg-Id"]
    assert outcomes(service.metrics.registry, "compiler") == {"ack": 2}


async def test_unknown_subjects_are_terminated_and_invalid_bodies_redelivered() -> None:
    service, store, _, _ = in_memory_compiler()
    async with TestNatsBroker(service.broker) as br:
        await br.publish({"anything": 1}, "lo.cmd.procedure.frobnicate", stream="LO_CMD")
        await br.publish({"actor": "not an actor"}, "lo.cmd.procedure.import", stream="LO_CMD")
    assert outcomes(service.metrics.registry, "compiler") == {"term": 1, "nak": 1}
    assert await store.read("procedure", "inv") == []


class ConflictingStore(MemoryEventStore):
    """Every append finds the aggregate moved on (another replica's decision landed first)."""

    async def append(self, events: Any, *, expected_position: int) -> list[int]:
        raise ConcurrencyError("the aggregate moved on")


async def test_a_concurrency_conflict_naks_the_command_for_a_new_decision() -> None:
    service, _, js, _ = in_memory_compiler()
    service.store = ConflictingStore()  # type: ignore[assignment]
    async with TestNatsBroker(service.broker) as br:
        await br.publish(ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("inv", "1")).model_dump(mode="json"),
                         "lo.cmd.procedure.import", stream="LO_CMD")
    assert outcomes(service.metrics.registry, "compiler") == {"nak": 1}
    assert js.published == []  # nothing was decided, so nothing is audited


async def test_the_handler_span_continues_the_trace_of_the_message_headers() -> None:
    tracing.configure()
    service, _, _, _ = in_memory_compiler()
    seen: list[str | None] = []
    original = service.on_import

    async def on_import(cmd: ImportProcedure) -> None:
        seen.append(tracing.current_trace_id())
        await original(cmd)

    service.commands.functions["lo.cmd.procedure.import"] = on_import
    with tracing.tracer().start_as_current_span("request") as span:
        headers = tracing.inject({})
        trace_id = tracing.trace_id_of(span)
    assert trace.get_current_span().get_span_context().is_valid is False
    async with TestNatsBroker(service.broker) as br:
        await br.publish(ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("inv", "1")).model_dump(mode="json"),
                         "lo.cmd.procedure.import", stream="LO_CMD", headers=dict(headers))
    assert seen == [trace_id]


async def test_approval_commands_reach_their_typed_handlers() -> None:
    service = ApprovalsService(ApprovalsSettings())
    store, js = MemoryEventStore(), RecordedPublishes()
    service.store = store  # type: ignore[assignment]
    service.audit = AuditWriter(js)  # type: ignore[arg-type]
    ended: list[str] = []

    async def run_end(run_id: str) -> str | None:
        ended.append(run_id)
        return None  # the run is still going

    service._run_end = run_end  # type: ignore[method-assign]
    request = RequestApproval(actor=Actor.system("runtime"), approval_id="a-1", run_id="r-1", procedure_id="p",
                              procedure_version="1", node_id="review", prompt="Refund?")
    unknown_decision = DecideApproval(actor=OPERATOR, approval_id="a-2", decision="approved")
    async with TestNatsBroker(service.broker) as br:
        await br.publish(request.model_dump(mode="json"), "lo.cmd.approval.request", stream="LO_CMD")
        await br.publish(unknown_decision.model_dump(mode="json"), "lo.cmd.approval.decide", stream="LO_CMD")
    [requested] = [e.envelope for e in await store.read("approval", "a-1")]
    assert (requested.type, requested.correlation_id, requested.data["prompt"]) == ("approval_requested", "r-1",
                                                                                   "Refund?")
    [rejected] = [e.envelope for e in await store.read("approval", "a-2")]
    assert (rejected.type, rejected.data["command_type"]) == ("command_rejected", "decide_approval")
    assert ended == ["r-1"]
    assert outcomes(service.metrics.registry, "approvals") == {"ack": 2}


async def test_a_run_end_reaches_the_run_ends_handler() -> None:
    service = ApprovalsService(ApprovalsSettings())
    handled: list[EventEnvelope] = []

    async def on_run_end(ev: EventEnvelope) -> None:
        handled.append(ev)

    service.run_ends_subscription.functions = {s: on_run_end for s in messaging.RUN_ENDS.messages}
    end = EventEnvelope(type="run_canceled", aggregate="run", aggregate_id="r-1", seq=7, actor=OPERATOR,
                        data={"reason": "operator"})
    async with TestNatsBroker(service.broker) as br:
        await br.publish(end.model_dump(mode="json"), "lo.evt.run.r-1.run_canceled", stream="LO_EVT")
        await br.publish(end.model_dump(mode="json"), "lo.evt.run.r-1.node_started", stream="LO_EVT")
    assert [(e.aggregate_id, e.type, e.seq) for e in handled] == [("r-1", "run_canceled", 7)]
    assert outcomes(service.metrics.registry, "approvals") == {"ack": 1}  # node_started is not on this consumer


async def test_agent_commands_decide_register_then_refuse_a_second_registration() -> None:
    registry = CollectorRegistry()
    service = AgentService(RuntimeSettings(), bus=BusMetrics(registry, "runtime"))
    store, js = MemoryEventStore(), RecordedPublishes()
    service.store = store  # type: ignore[assignment]
    service.audit = AuditWriter(js)  # type: ignore[arg-type]

    async def synced_registry() -> list[Any]:
        return []

    service._synced_registry = synced_registry  # type: ignore[method-assign]
    register = {"name": "Desk", "channel": "web", "base_url": "http://127.0.0.1:9", "resource_key": "desk",
                "pool_id": "desk", "token_sha256": "0" * 64}
    first = RegisterAgent(actor=OPERATOR, agent_id="desk-1", **register)
    second = RegisterAgent(actor=OPERATOR, agent_id="desk-1", **register)
    missing = RemoveAgent(actor=OPERATOR, agent_id="nobody")
    async with TestNatsBroker(service.broker) as br:
        for command in (first, second, missing):
            await br.publish(command.model_dump(mode="json"), messaging.command_subject_of(type(command)),
                             stream="LO_CMD")
    assert [(e.envelope.type, e.envelope.causation_id) for e in await store.read("agent", "desk-1")] == [
        ("agent_registered", first.command_id), ("command_rejected", second.command_id)]
    [refused] = await store.read("agent", "nobody")
    assert (refused.envelope.data["command_type"], refused.envelope.data["code"]) == ("remove_agent", "not_found")
    assert outcomes(registry, "runtime") == {"ack": 3}


def test_every_consumer_keeps_its_durable_name_and_filters() -> None:
    """An existing state directory keeps working: the durable consumers are the ones the services created."""
    assert {c.durable: (c.stream, c.filter_subjects) for c in messaging.CONSUMERS} == {
        "compiler": ("LO_CMD", ("lo.cmd.procedure.>",)),
        "approvals": ("LO_CMD", ("lo.cmd.approval.>",)),
        "runtime-agents": ("LO_CMD", ("lo.cmd.agent.>", "lo.cmd.lease.>")),
        "runtime": ("LO_CMD", ("lo.cmd.run.start", "lo.cmd.run.resume", "lo.cmd.run.retry", "lo.cmd.run.cancel",
                               "lo.cmd.run.delete")),
        "runtime-create": ("LO_CMD", ("lo.cmd.run.create",)),
        "triggers": ("LO_CMD", ("lo.cmd.trigger.>",)),
        "approvals_run_ends": ("LO_EVT", ("lo.evt.run.*.run_completed", "lo.evt.run.*.run_failed",
                                          "lo.evt.run.*.run_canceled")),
        "triggers_run_slots": ("LO_EVT", ("lo.evt.run.*.run_created", "lo.evt.run.*.run_retry_requested",
                                          "lo.evt.run.*.run_completed", "lo.evt.run.*.run_failed",
                                          "lo.evt.run.*.run_canceled")),
        "triggers_sync": ("LO_EVT", ("lo.evt.procedure.*.procedure_status_changed",
                                     "lo.evt.procedure.*.procedure_promoted",
                                     "lo.evt.procedure.*.procedure_rolled_back")),
        "triggers_events": ("LO_EXT", ("lo.ext.>",)),
    }
    # the runtime's own consumers (on nats-py) are documented as they are created
    assert (messaging.RUN_COMMANDS.durable, messaging.RUN_COMMANDS.filter_subjects) == (RUN_CONSUMER,
                                                                                        EXECUTE_SUBJECTS)
    assert (messaging.RUN_CREATIONS.durable, messaging.RUN_CREATIONS.filter_subjects) == (CREATE_CONSUMER,
                                                                                          CREATE_SUBJECTS)
    single = messaging.PROCEDURE_COMMANDS.config()
    assert (single.durable_name, single.filter_subject, single.filter_subjects, single.ack_wait) == (
        "compiler", None, None, 30)  # nats-py sets filter_subject from the subscriber's subject when it creates it
    ends = messaging.RUN_ENDS.config()
    assert (ends.deliver_policy.value if ends.deliver_policy else None, ends.filter_subjects) == (
        "all", list(messaging.RUN_ENDS.filter_subjects))
    assert messaging.APPROVAL_COMMANDS.config(ack_wait_s=7).ack_wait == 7


class FailingOverSubscription:
    """A pull subscription whose fetches fail as during a server failover, then deliver."""

    def __init__(self, failures: list[Exception], messages: list[Any]) -> None:
        self.failures = failures
        self.messages = messages
        self.fetches = 0

    async def fetch(self, batch: int, timeout: float) -> list[Any]:
        self.fetches += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.messages


async def test_a_fetch_survives_a_failover(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ServiceUnavailableError`` (no JetStream leader yet), a closed or reconnecting connection and a timeout
    are transient: the fetch returns nothing and the consumer fetches again."""
    monkeypatch.setattr(bus, "FETCH_RETRY_PAUSE_S", 0.0)
    message: Any = "message"
    sub = FailingOverSubscription([ServiceUnavailableError(code=503, description="no responders"),
                                   ConnectionClosedError(), ConnectionReconnectingError(), NatsTimeoutError()],
                                  [message])
    assert [await bus.fetch(sub, 1, 0.1) for _ in range(5)] == [[], [], [], [], [message]]
    assert sub.fetches == 5
    with pytest.raises(ValueError, match="not transient"):
        await bus.fetch(FailingOverSubscription([ValueError("not transient")], []), 1, 0.1)
