"""The triggers service: single writer of trigger aggregates (api.md §10), one per procedure version
(``<procedure_id>@<version>``).

* ``lo.cmd.trigger.upsert`` / ``.delete`` / ``.enable`` / ``.disable`` → ``trigger_registered``,
  ``trigger_updated``, ``trigger_deleted``, ``trigger_enabled``, ``trigger_disabled`` | ``command_rejected``
  (validation of §10.2, ``precondition_failed`` for a stale ``If-Match``, ``not_found``).
* ``lo.cmd.trigger.fire`` → the dedupe check of §10.3 (key ``dedupe.<trigger>.<key>`` in KV ``lo_locks``, created
  atomically), the concurrency slot of ``max_concurrent_runs`` (:mod:`langorch_triggers.slots`), then the run's
  creation through the run owner's ``lo.cmd.run.create`` (the runtime decides it and
  starts the run), then ``trigger_fired {run_id}`` | ``trigger_fire_skipped {outcome, reason}``.
* ``triggers_run_slots`` (runs created, retried and ended, on ``LO_EVT``) → the procedures' concurrency slots: one
  durable consumer for every replica, one event in flight, so each is applied once and in order.
* ``triggers_sync`` (versions becoming active, on ``LO_EVT``) → the ``source: ckp`` registration of the
  version's ``trigger`` block (:mod:`langorch_triggers.sync`).
* ``triggers_events`` (external messages on ``LO_EXT``) → one fire per matching ``event`` registration
  (:mod:`langorch_triggers.events`).
* the scheduler (the replica holding ``leader.scheduler`` in ``lo_locks``) → one ``lo.cmd.trigger.fire`` per cron
  slot and per file modification, identified by the slot or the modification (:mod:`langorch_triggers.scheduler`).

A fire's run id is chosen by its submitter and the creation carries the fire's command id, so a redelivered fire
finds the same run (JetStream drops the republished creation) and records the same outcome.

The webhook intake is the gateway's (it publishes ``lo.cmd.trigger.fire``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ckp_core import runs
from ckp_core.commands import CreateRun, DeleteTrigger, DisableTrigger, EnableTrigger, FireTrigger, UpsertTrigger
from ckp_core.errors import CommandRefused
from ckp_core.events import EventData, EventEnvelope, TriggerFired, TriggerFireSkipped, format_time
from ckp_core.eventstore import StoredEvent
from ckp_core.subjects import COMMAND_STREAM, EVENT_STREAM, LOCKS_BUCKET, aggregate_filter, kv_token
from ckp_core.triggers import (
    TriggerState,
    decide_delete,
    decide_disable,
    decide_enable,
    decide_upsert,
    evolve,
    fire_inputs,
    fold,
    trigger_id,
)
from langorch_infra import messaging
from langorch_infra.audit import AuditWriter
from langorch_infra.bus import BusMetrics
from langorch_infra.handling import AggregateCache, CommandHandler
from langorch_infra.hosting import ServiceHost, bus_checks
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology, follow, publish_command
from langorch_infra.metrics import ObservedEventStore
from langorch_infra.settings import TriggersSettings
from langorch_triggers.events import EventConsumer
from langorch_triggers.metrics import VERSION, TriggersMetrics
from langorch_triggers.registry import Registry
from langorch_triggers.scheduler import Scheduler
from langorch_triggers.slots import Slots
from langorch_triggers.sync import TriggerSync

log = logging.getLogger(__name__)


def dedupe_key(trigger: str, key: str) -> str:
    """``lo_locks`` key of one delivery in a trigger's dedupe window: ``dedupe.<trigger>.<key>``."""
    return f"dedupe.{kv_token(trigger)}.{kv_token(key)}"


class TriggersService:
    """One triggers replica."""

    def __init__(self, settings: TriggersSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.nc: NATS | None = None
        self.metrics = TriggersMetrics()
        self.states: AggregateCache[TriggerState] = AggregateCache(
            TriggerState, lambda state, stored: evolve(state, stored.envelope, stored.position))
        self.bus = BusMetrics(self.metrics.registry, "triggers")
        self.broker = messaging.broker(settings.nats_url, f"langorch-triggers-{self.instance}", self.bus, settings)
        self.command_subscription = messaging.Subscription(
            self.broker, messaging.TRIGGER_COMMANDS, ack_wait_s=settings.ack_wait_s).handle(self.handlers)
        self.sync = TriggerSync(self)  # the triggers_sync consumer: trigger blocks on activation
        self.run_slots_subscription = messaging.Subscription(self.broker, messaging.RUN_SLOTS,
                                                             conflicts_nak=False).handle(
            {subject: self.on_run_event for subject in messaging.RUN_SLOTS.messages})

    async def start(self) -> None:
        self.nc = await messaging.connect(self.broker)
        self.js: JetStreamContext = self.nc.jetstream()
        await ensure_topology(self.js, audit_retention_days=self.settings.audit_retention_days,
                              replicas=self.settings.nats_replicas)
        self.store: JetStreamEventStore = ObservedEventStore(self.js, self.metrics.observe)
        self.audit = AuditWriter(self.js)
        self.locks: KeyValue = await self.js.key_value(LOCKS_BUCKET)
        self.slots = Slots(self.js, self.locks)
        self.registry = Registry(self.js)  # registrations and version statuses, caught up before work starts
        await self.registry.start()
        self.scheduler = Scheduler(self)  # schedules and file watches, while this replica holds the lock
        self.events = EventConsumer(self)  # event triggers: the LO_EXT consumer
        await self.events.start()

    async def run(self) -> None:
        """Handle trigger commands, run the scheduler and consume LO_EXT until cancelled."""
        try:
            await messaging.start_consuming(self.broker)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.scheduler.run())
                tasks.create_task(self.events.run())
        finally:
            await messaging.stop_consuming(self.broker)

    async def stop(self) -> None:
        if hasattr(self, "scheduler"):
            await self.scheduler.stop()
        if hasattr(self, "registry"):
            await self.registry.stop()
        with contextlib.suppress(Exception):  # shutdown: a lost connection has nothing left to close
            await messaging.close(self.broker, self.nc)

    def leader_of(self) -> list[str]:
        """The leader locks this replica holds now (its presence lists them): ``scheduler`` or none."""
        scheduler: Scheduler | None = getattr(self, "scheduler", None)
        return scheduler.leader_of() if scheduler is not None else []

    async def ready_checks(self) -> dict[str, str]:
        """NATS connected, the event and command streams and the lock bucket present (api.md §3)."""
        return await bus_checks(self.nc, getattr(self, "js", None), (EVENT_STREAM, COMMAND_STREAM), (LOCKS_BUCKET,))

    @property
    def handlers(self) -> dict[str, messaging.Handler]:
        return {messaging.command_subject_of(UpsertTrigger): self.on_upsert,
                messaging.command_subject_of(DeleteTrigger): self.on_delete,
                messaging.command_subject_of(EnableTrigger): self.on_enable,
                messaging.command_subject_of(DisableTrigger): self.on_disable,
                messaging.command_subject_of(FireTrigger): self.on_fire}

    @property
    def handler(self) -> CommandHandler[TriggerState]:
        """Load → decide → append → audit on the trigger aggregate (its state cached: a trigger gains an event per
        fire, and each decision reads only what was appended since the last one)."""
        return CommandHandler(self.store, "trigger", _fold, audit=self.audit, cache=self.states)

    async def load(self, procedure_id: str, version: str) -> TriggerState:
        return (await self.handler.load(trigger_id(procedure_id, version))).state

    # -- registrations --------------------------------------------------------------------------------------

    async def on_upsert(self, cmd: UpsertTrigger) -> None:
        await self.handler.handle(trigger_id(cmd.procedure_id, cmd.version), cmd,
                                  lambda state: decide_upsert(state, cmd), command_type="upsert_trigger")

    async def on_delete(self, cmd: DeleteTrigger) -> None:
        await self.handler.handle(trigger_id(cmd.procedure_id, cmd.version), cmd,
                                  lambda state: decide_delete(state, cmd), command_type="delete_trigger")

    async def on_enable(self, cmd: EnableTrigger) -> None:
        await self.handler.handle(trigger_id(cmd.procedure_id, cmd.version), cmd,
                                  lambda state: decide_enable(state, cmd), command_type="enable_trigger")

    async def on_disable(self, cmd: DisableTrigger) -> None:
        await self.handler.handle(trigger_id(cmd.procedure_id, cmd.version), cmd,
                                  lambda state: decide_disable(state, cmd), command_type="disable_trigger")

    # -- fires ----------------------------------------------------------------------------------------------

    async def on_fire(self, cmd: FireTrigger) -> None:
        await self.fire(cmd)

    async def fire(self, cmd: FireTrigger) -> EventEnvelope | None:
        """Fire once: dedupe, create the run through its owner, record the outcome on the trigger. Returns the
        outcome event (``trigger_fired`` | ``trigger_fire_skipped`` | ``command_rejected``; the recorded one for a
        repeated command), for the in-process callers (scheduler, event consumer)."""
        tid = trigger_id(cmd.procedure_id, cmd.version)
        received = datetime.now(UTC)
        created: list[EventEnvelope] = []

        async def decide(state: TriggerState) -> EventData:
            if not state.exists:
                raise CommandRefused("not_found", f"no trigger is registered for {tid}", resource="trigger")
            common: dict[str, Any] = {
                "procedure_id": cmd.procedure_id, "version": cmd.version, "fire_id": cmd.command_id,
                "trigger_type": cmd.trigger_type, "triggered_by": cmd.triggered_by,
                "source_detail": cmd.source_detail}
            window = int(state.config.get("dedupe_window_seconds") or 0)
            claim: tuple[str, int] | None = None
            if window > 0 and cmd.dedupe_key:
                first = await self._claim(dedupe_key(tid, cmd.dedupe_key), cmd.run_id, window)
                if isinstance(first, dict):
                    return TriggerFireSkipped(
                        **common, outcome="duplicate", reason="duplicate_delivery", run_id=first["run_id"],
                        detail=f"the same delivery already started run {first['run_id']}",
                        extra={"existing_run_id": first["run_id"], "first_seen_at": first["first_seen_at"]})
                claim = (dedupe_key(tid, cmd.dedupe_key), first)
            limit = state.config.get("max_concurrent_runs")
            if limit:
                granted, active = await self.slots.acquire(cmd.procedure_id, cmd.run_id, int(limit))
                self.metrics.slots_held.labels(procedure_id=cmd.procedure_id).set(active)
                if not granted:
                    await self._unclaim(claim)
                    return TriggerFireSkipped(
                        **common, outcome="throttled", reason="max_concurrent_runs",
                        detail=f"{active} runs of {cmd.procedure_id} have not ended; the limit is {limit}",
                        extra={"active_runs": active, "limit": int(limit),
                               "retry_after_s": self.settings.concurrency_retry_after_s})
            outcome = await self._create_run(state, cmd)
            if outcome.type == "command_rejected":
                await self._unclaim(claim)
                if limit:
                    await self.slots.release(cmd.procedure_id, cmd.run_id)
                data = outcome.data
                return TriggerFireSkipped(**common, outcome="invalid", reason=str(data.get("code")),
                                          detail=data.get("detail"), extra=dict(data.get("extra") or {}))
            created.append(outcome)
            return TriggerFired(**common, run_id=cmd.run_id)

        handled = await self.handler.handle(tid, cmd, decide, command_type="fire_trigger")
        if created and not handled.replayed and handled.event is not None and handled.event.type == "trigger_fired":
            lag = (created[-1].occurred_at - received).total_seconds()
            self.metrics.lag.labels(trigger_type=cmd.trigger_type).observe(max(0.0, lag))
        return handled.event

    async def _unclaim(self, claim: tuple[str, int] | None) -> None:
        """Give up a delivery's dedupe claim: the delivery started nothing, so a retry of it is not a duplicate."""
        if claim is not None:
            with contextlib.suppress(NatsError):
                await self.locks.delete(claim[0], last=claim[1])

    async def _claim(self, key: str, run_id: str, window_s: int) -> dict[str, Any] | int:
        """Create the dedupe key for this delivery (its revision), or the first delivery's record when one
        within the window holds it. An expired record is replaced, revision-checked; a record naming this very
        run is this fire's own claim (a redelivery)."""
        value = json.dumps({"run_id": run_id, "first_seen_at": format_time(datetime.now(UTC))}).encode()
        while True:
            try:
                return int(await self.locks.create(key, value))
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.locks.get(key)
            except KeyNotFoundError:
                continue  # deleted meanwhile: create again
            record: dict[str, Any] = json.loads(entry.value or b"{}")
            revision = int(entry.revision or 0)
            if record.get("run_id") == run_id:
                return revision
            seen = datetime.fromisoformat(str(record.get("first_seen_at")).replace("Z", "+00:00"))
            if (datetime.now(UTC) - seen).total_seconds() < window_s:
                return record
            try:
                return int(await self.locks.update(key, value, last=revision))
            except KeyWrongLastSequenceError:
                continue  # another delivery replaced it first: read again

    async def _create_run(self, state: TriggerState, cmd: FireTrigger) -> EventEnvelope:
        """Submit the run's creation to the runtime and return its outcome: ``run_created`` or
        ``command_rejected`` (the first event of the run's aggregate, caused by this fire)."""
        create = CreateRun(command_id=cmd.command_id, actor=cmd.actor, causation_id=cmd.causation_id,
                           run_id=cmd.run_id, procedure_id=cmd.procedure_id, procedure_version=cmd.version,
                           input_vars=fire_inputs(state, cmd.input_vars), trigger_type=cmd.trigger_type,
                           triggered_by=cmd.triggered_by, root_run_id=cmd.run_id, project_id=cmd.project_id)
        await publish_command(self.js, create, msg_id=create.msg_id)
        async with (asyncio.timeout(self.settings.fire_timeout_s),
                    contextlib.aclosing(follow(self.js, aggregate_filter("run", cmd.run_id))) as events):
            async for stored in events:  # closed on return: its consumer is deleted now, not when collected
                if stored.envelope.causation_id == cmd.command_id:
                    return stored.envelope
        raise AssertionError("unreachable: follow never ends")  # pragma: no cover

    # -- concurrency slots ----------------------------------------------------------------------------------------

    async def on_run_event(self, ev: EventEnvelope) -> None:
        """A created or retried run takes a slot of its procedure, an ended one frees it (acked after the write)."""
        if ev.type == "run_created":
            procedure = str(ev.model_dump()["data"]["procedure_id"])
        else:
            found = await self.slots.procedure_of(ev.aggregate_id)
            if found is None:
                return  # deleted since: its slot, if any, is freed by the check at the limit
            procedure = found
        if ev.type in runs.END_EVENTS:
            held = await self.slots.release(procedure, ev.aggregate_id)
        else:
            held = await self.slots.track(procedure, ev.aggregate_id, ev.occurred_at)
        self.metrics.slots_held.labels(procedure_id=procedure).set(held)


def _fold(tid: str, history: Sequence[StoredEvent]) -> TriggerState:
    return fold(tid, ((e.envelope, e.position) for e in history))


def host(settings: TriggersSettings) -> ServiceHost:
    """One triggers replica with its presence key and its /metrics, /health and /ready."""
    service = TriggersService(settings)
    return ServiceHost("triggers", VERSION, settings, [service], service.metrics.registry)


async def serve(settings: TriggersSettings, *, metrics_port: int | None = None) -> None:
    """Run one triggers replica until cancelled (``metrics_port`` 0: no HTTP endpoint)."""
    await host(settings).serve(metrics_port)
