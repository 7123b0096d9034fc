"""Event triggers: the ``LO_EXT`` consumer (api.md §10.4, §16.3).

External systems publish under ``lo.ext.>``. Every enabled ``event`` registration of an ``active`` version whose
``event_source`` (``nats://<subject pattern>``, ``*`` and ``>`` allowed) matches a message's subject fires once for
that message: in process, through :meth:`TriggersService.fire` (dedupe, concurrency slot, the run's creation by
the runtime, the ``trigger_fired`` | ``trigger_fire_skipped`` outcome), with the inputs of §10.4
(:func:`~ckp_core.webhook_signing.event_message_inputs`) and the message's dedupe key (its ``Nats-Msg-Id``, else
its payload's hash).

One durable pull consumer, ``triggers_events``, is shared by every replica, so a message is handled by one replica
at a time; a message published while no replica runs waits in the stream (kept 7 days). The fire's run id is
derived from the message (stream sequence and timestamp) and the trigger, and so is its command id: a redelivery
after a crash is the same fire, whose recorded outcome the command handler finds instead of creating a second run.

A message is acked once every match is decided: the run created, a duplicate or refused inputs recorded, or the
registration gone meanwhile. One no registration matches, or whose matching registrations' ``event_filter``
(:class:`EventFilters`) all say no, is acked too (and counted). At a trigger's
``max_concurrent_runs`` the fire is refused (``throttled``, recorded as every refusal is) and the message nak'ed
with the outcome's ``retry_after_s``; the redelivery is the next *attempt*, with a command id of its own (the one
before already has its recorded refusal) and the same run id. Any other failure naks the message with a backoff
that grows with its deliveries: it is redelivered, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from ckp_core.commands import FireTrigger
from ckp_core.events import Actor, EventEnvelope
from ckp_core.eventstore import StoredEvent
from ckp_core.expressions import ExpressionError, MappingScope, evaluate_condition
from ckp_core.ir import ExpressionIR, ProcedureIR
from ckp_core.subjects import EXTERNAL_STREAM, PROCEDURES_BUCKET, procedure_key, subject_matches
from ckp_core.triggers import TriggerState, event_subject
from ckp_core.webhook_signing import event_dedupe_key, event_message_inputs
from langorch_infra import messaging
from langorch_infra.bus import ACK, Settle, consume, nak
from langorch_infra.jetstream import ensure_consumer

if TYPE_CHECKING:
    from langorch_triggers.service import TriggersService

log = logging.getLogger(__name__)

CONSUMER = messaging.EXTERNAL_EVENTS
BACKLOG_SAMPLE_S = 5.0
"""Seconds between two looks at the consumer's oldest pending message (the backlog age gauge)."""
MAX_BACKOFF_S = 60.0
_IDS = uuid.UUID("0c9d3f5e-6a1b-4f27-8e0d-2b7a5c41e9d3")
"""Namespace of the ids derived from a message (UUIDv5)."""


def matching(registrations: list[TriggerState], subject: str) -> list[TriggerState]:
    """The registrations whose ``event_source`` pattern matches ``subject``, in trigger id order."""
    found = []
    for state in registrations:
        pattern = event_subject(str(state.config.get("event_source") or ""))
        if pattern is not None and subject_matches(pattern, subject):
            found.append(state)
    return sorted(found, key=lambda s: s.trigger_id)


def message_key(msg: Msg) -> str:
    """The stored message's identity: its ``LO_EXT`` sequence and timestamp (a sequence alone would repeat if the
    stream were ever recreated)."""
    meta = msg.metadata
    return f"{meta.sequence.stream}:{meta.timestamp.isoformat() if meta.timestamp else ''}"


def fire_run_id(message: str, tid: str) -> str:
    """The run a message starts through one trigger: the same for every delivery and attempt."""
    return str(uuid.uuid5(_IDS, f"run:{message}:{tid}"))


def fire_command_id(message: str, tid: str, attempt: int) -> str:
    """The fire command of one attempt (0 first; one more after each refusal at the concurrency limit)."""
    return str(uuid.uuid5(_IDS, f"fire:{message}:{tid}:{attempt}"))


def backoff_s(deliveries: int) -> float:
    """Delay before the redelivery of a message whose handling failed: 1 s, doubling, at most a minute."""
    return min(MAX_BACKOFF_S, 2.0 ** max(0, deliveries - 1))


class EventFilters:
    """The ``event_filter`` of registrations made from a document's ``trigger`` block (``source: ckp``; the API's
    registrations have none): read once from the version's compiled document in ``lo_procedures`` (an active
    version's document does not change) and forgotten when the registration or its version changes. The filter
    sees the run's event inputs (``event_payload``, ``event_attributes``, ``event_source``, ``event_message_id``);
    a false value, or an error evaluating it, means the registration does not fire for the message."""

    def __init__(self, service: TriggersService) -> None:
        self.service = service
        self._kv: KeyValue | None = None
        self._known: dict[str, ExpressionIR | None] = {}
        service.registry.listeners.append(self.forget)

    def forget(self, tid: str) -> None:
        self._known.pop(tid, None)

    async def passing(self, states: list[TriggerState], msg: Msg) -> list[TriggerState]:
        """The registrations among ``states`` whose filter (if any) holds for ``msg``."""
        scope: MappingScope | None = None
        passed = []
        for state in states:
            expr = await self.filter_of(state)
            if expr is not None:
                scope = scope or MappingScope(event_message_inputs(
                    msg.subject, msg.data, dict(msg.headers or {}), stream_sequence=msg.metadata.sequence.stream))
                try:
                    if not evaluate_condition(expr.compiled, scope):
                        continue
                except ExpressionError as exc:
                    log.warning("the event_filter of %s failed on %s (LO_EXT %s): %s; not fired", state.trigger_id,
                                msg.subject, msg.metadata.sequence.stream, exc)
                    continue
            passed.append(state)
        return passed

    async def filter_of(self, state: TriggerState) -> ExpressionIR | None:
        if state.config.get("source") != "ckp":
            return None
        tid = state.trigger_id
        if tid not in self._known:
            if self._kv is None:
                self._kv = await self.service.js.key_value(PROCEDURES_BUCKET)
            entry = await self._kv.get(procedure_key(str(state.procedure_id), str(state.version)))
            trigger = ProcedureIR.model_validate_json(entry.value or b"{}").trigger
            self._known[tid] = trigger.event_filter if trigger is not None else None
        return self._known[tid]


class EventConsumer:
    """The ``triggers_events`` consumer of one replica, firing through ``service``."""

    def __init__(self, service: TriggersService) -> None:
        self.service = service
        self.metrics = service.metrics
        self.sub: JetStreamContext.PullSubscription | None = None
        self.filters = EventFilters(service)

    async def start(self) -> None:
        """Create (or bring to its declaration) the durable consumer and bind to it."""
        js = self.service.js
        config = replace(CONSUMER.config(self.service.settings.ack_wait_s), filter_subject=CONSUMER.subject)
        await ensure_consumer(js, CONSUMER.stream, config)
        self.sub = await js.pull_subscribe_bind(CONSUMER.durable, stream=CONSUMER.stream)

    async def run(self) -> None:
        """Handle messages until cancelled, one at a time (a fetched message's ack wait runs while it waits), and
        keep the backlog age gauge current."""
        sampler = asyncio.create_task(self._sample_backlog())
        try:
            await consume(self.sub, self.handle, self.service.bus, batch=1)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    async def handle(self, msg: Msg) -> Settle:
        """Fire every matching registration once for ``msg``; ack, or nak at a concurrency limit or a failure."""
        candidates = matching(self.service.registry.live("event"), msg.subject)
        retry_after: list[float] = []
        try:
            matches = await self.filters.passing(candidates, msg) if candidates else []
            result = "matched" if matches else "filtered" if candidates else "unmatched"
            self.metrics.events.labels(result=result).inc()
            if not matches:
                log.debug("%s (LO_EXT %s): no event trigger fires (%s)", msg.subject, msg.metadata.sequence.stream,
                          result)
                return ACK
            for n, state in enumerate(matches):
                if n:  # each fire may take up to its creation timeout: the next one gets a fresh ack wait
                    with contextlib.suppress(NatsError):
                        await msg.in_progress()
                outcome = await self.fire(msg, state)
                if outcome is not None and outcome.type == "trigger_fire_skipped" \
                        and outcome.data.get("outcome") == "throttled":
                    extra = outcome.data.get("extra") or {}
                    retry_after.append(float(extra.get("retry_after_s")
                                             or self.service.settings.concurrency_retry_after_s))
        except asyncio.CancelledError:
            raise
        except Exception:  # any failure of a fire: the message comes back later, with the same fire ids
            deliveries = msg.metadata.num_delivered or 1
            log.exception("%s (LO_EXT %s, delivery %d) not handled; redelivered", msg.subject,
                          msg.metadata.sequence.stream, deliveries)
            return nak(backoff_s(deliveries))
        return nak(max(retry_after)) if retry_after else ACK

    async def fire(self, msg: Msg, state: TriggerState) -> EventEnvelope | None:
        """One trigger's fire for ``msg``: its outcome event (recorded now or by an earlier delivery). A first
        delivery is attempt 0; a redelivery skips the attempts whose recorded outcome is a refusal at the
        concurrency limit (the trigger's cached state knows what each command caused)."""
        redelivered = (msg.metadata.num_delivered or 1) > 1
        attempt = 0
        while True:
            command = self.command(msg, state, attempt)
            if redelivered and _throttled((await self.service.handler.load(state.trigger_id, command)).done):
                attempt += 1
                continue
            return await self.service.fire(command)

    def command(self, msg: Msg, state: TriggerState, attempt: int) -> FireTrigger:
        """The fire of ``msg`` through ``state``'s registration, attempt ``attempt``."""
        procedure_id, version = str(state.procedure_id), str(state.version)
        headers = dict(msg.headers or {})
        sequence = msg.metadata.sequence.stream
        message = message_key(msg)
        inputs = event_message_inputs(msg.subject, msg.data, headers, stream_sequence=sequence)
        return FireTrigger(
            command_id=fire_command_id(message, state.trigger_id, attempt),
            actor=Actor(kind="trigger", id=state.trigger_id), procedure_id=procedure_id, version=version,
            run_id=fire_run_id(message, state.trigger_id), trigger_type="event",
            triggered_by=f"event:{msg.subject}", input_vars=inputs,
            dedupe_key=event_dedupe_key(msg.data, headers),
            source_detail={"subject": msg.subject, "stream_sequence": sequence,
                           "event_message_id": inputs["event_message_id"], "attempt": attempt},
            project_id=self.service.registry.project_of(procedure_id, version))

    async def _sample_backlog(self) -> None:
        while True:
            try:
                self.metrics.event_backlog_age.set(await self.backlog_age())
            except asyncio.CancelledError:
                raise
            except Exception:  # a gauge must not stop the consumer; the next look tries again
                log.debug("event backlog age not sampled", exc_info=True)
            await asyncio.sleep(BACKLOG_SAMPLE_S)

    async def backlog_age(self) -> float:
        """Seconds since the oldest message the consumer has not acked was stored (0 when none is pending): the
        first message after the ack floor."""
        js = self.service.js
        info = await js.consumer_info(CONSUMER.stream, CONSUMER.durable)
        if not (info.num_pending or info.num_ack_pending):
            return 0.0
        floor = info.ack_floor.stream_seq if info.ack_floor is not None and info.ack_floor.stream_seq else 0
        try:
            oldest = await js.get_msg(EXTERNAL_STREAM, floor + 1, subject=CONSUMER.subject, next=True)
        except NotFoundError:
            return 0.0
        if oldest.time is None:
            return 0.0
        return max(0.0, (datetime.now(UTC) - oldest.time).total_seconds())


def _throttled(outcome: Sequence[StoredEvent]) -> bool:
    """A command's recorded outcome is a refusal at the concurrency limit."""
    return any(e.envelope.type == "trigger_fire_skipped" and e.envelope.data.get("outcome") == "throttled"
               for e in outcome)
