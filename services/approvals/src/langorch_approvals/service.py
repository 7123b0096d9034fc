"""The approvals service: single writer of approval aggregates (api.md §6).

* ``lo.cmd.approval.request`` (the runtime reached a ``human_approval`` node) → ``approval_requested``.
* ``lo.cmd.approval.decide`` (a principal's decision through the gateway) → ``approval_decided`` and then
  ``lo.cmd.run.resume`` | ``command_rejected{approval_not_pending|approval_expired|invalid_decision|
  validation_failed}``.
* Timers (§6.4): every replica folds ``lo.evt.approval.>`` from the start of the stream to know the pending
  approvals; only the holder of ``leader.approval_timer`` in ``lo_locks`` appends ``approval_timed_out`` when one
  passes its ``expires_at`` and resumes the run with ``resume_reason: approval_timeout``.
* Run ends (§5.2): a durable consumer of the runs' terminal events cancels their pending approvals
  (``approval_canceled``, actor ``system:approvals``).

Every append carries the aggregate's expected position, so of a decision, a timeout and a cancel racing on one
approval exactly one lands; the others re-read the aggregate and are rejected or dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ckp_core import runs
from ckp_core.approvals import ApprovalState, check_decision, evolve, fold, resolution, timeout_outcome
from ckp_core.commands import DecideApproval, RequestApproval, ResumeRun
from ckp_core.errors import ConcurrencyError
from ckp_core.events import (
    Actor,
    ApprovalCanceled,
    ApprovalDecided,
    ApprovalRequested,
    ApprovalTimedOut,
    EventData,
    EventEnvelope,
    format_time,
    make_event,
    utc_now,
)
from ckp_core.eventstore import StoredEvent
from ckp_core.subjects import COMMAND_STREAM, EVENT_STREAM, LOCKS_BUCKET, aggregate_filter
from langorch_approvals.metrics import VERSION, ApprovalsMetrics
from langorch_infra import messaging
from langorch_infra.audit import AuditWriter
from langorch_infra.bus import BusMetrics
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.handling import CommandHandler, Handled
from langorch_infra.hosting import ServiceHost, bus_checks
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology, follow, publish_command
from langorch_infra.kv import LeaderLock
from langorch_infra.metrics import ObservedEventStore
from langorch_infra.settings import ApprovalsSettings

log = logging.getLogger(__name__)

COMMAND_CONSUMER = messaging.APPROVAL_COMMANDS.durable
RUN_ENDS_CONSUMER = messaging.RUN_ENDS.durable
ACTOR = Actor.system("approvals")


def resume_msg_id(approval_id: str) -> str:
    """One resume per approval: a decision and a timeout cannot both land, and a republish is dropped."""
    return f"approval-resume-{approval_id}"


class ApprovalsService:
    """One approvals replica."""

    def __init__(self, settings: ApprovalsSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.nc: NATS | None = None
        self.pending: dict[str, ApprovalState] = {}  # approval id → state, pending ones only
        self.by_run: dict[str, set[str]] = {}
        self.index_position = 0
        self.unresumed: dict[str, ApprovalState] = {}  # timed out, but publishing the resume failed: retried
        self._indexed = asyncio.Condition()
        self._tasks: list[asyncio.Task[Any]] = []
        self.metrics = ApprovalsMetrics()
        self.bus = BusMetrics(self.metrics.registry, "approvals")
        self.broker = messaging.broker(settings.nats_url, f"langorch-approvals-{self.instance}", self.bus,
                                       settings)
        self.command_subscription = messaging.Subscription(
            self.broker, messaging.APPROVAL_COMMANDS, ack_wait_s=settings.ack_wait_s).handle(self.handlers)
        self.run_ends_subscription = messaging.Subscription(self.broker, messaging.RUN_ENDS,
                                                             conflicts_nak=False).handle(
            {subject: self._handle_run_end for subject in messaging.RUN_ENDS.messages})

    async def start(self) -> None:
        self.nc = await messaging.connect(self.broker)
        self.js: JetStreamContext = self.nc.jetstream()
        await ensure_topology(self.js, audit_retention_days=self.settings.audit_retention_days,
                              replicas=self.settings.nats_replicas)
        self.store: JetStreamEventStore = ObservedEventStore(
            self.js, lambda event: self.metrics.observe(event, self._requested_at))
        self.audit = AuditWriter(self.js)
        self.lock = LeaderLock(self.js, "approval_timer", self.instance, self.settings.leader_lock_ttl_s)

    async def run(self) -> None:
        """Handle commands and run ends, keep the index, hold the timer lock and fire timeouts — until cancelled."""
        self._tasks = [asyncio.create_task(c) for c in (
            self._follow_approvals(), self.lock.keep(), self._tick_forever())]
        try:
            await messaging.start_consuming(self.broker)
            await asyncio.gather(*self._tasks)
        finally:
            await messaging.stop_consuming(self.broker)
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                    await t

    async def stop(self) -> None:
        with contextlib.suppress(NatsError, OSError):  # the lock expires by its TTL anyway
            await self.lock.release()
        with contextlib.suppress(Exception):  # shutdown: a lost connection has nothing left to close
            await messaging.close(self.broker, self.nc)

    @property
    def commands(self) -> Any:
        """The command consumer's nats-py pull subscription (``consumer_info()``), once consuming."""
        return self.command_subscription.pull

    def leader_of(self) -> list[str]:
        """The leader locks this replica holds now (its presence lists them)."""
        lock: LeaderLock | None = getattr(self, "lock", None)
        return [lock.name] if lock is not None and lock.held else []

    async def ready_checks(self) -> dict[str, str]:
        """NATS connected, the event and command streams and the lock bucket present (api.md §3)."""
        return await bus_checks(self.nc, getattr(self, "js", None), (EVENT_STREAM, COMMAND_STREAM), (LOCKS_BUCKET,))

    async def _requested_at(self, approval_id: str) -> float | None:
        """When an approval was requested (its first event), for the decision latency."""
        history = await self.store.read("approval", approval_id)
        return history[0].envelope.occurred_at.timestamp() if history else None

    # -- commands ----------------------------------------------------------------------------------------

    @property
    def handlers(self) -> dict[str, messaging.Handler]:
        """The function of each approval command subject (a ``ConcurrencyError`` naks the command: a decision,
        timeout or cancel landed first, and the redelivery decides again)."""
        return {messaging.command_subject_of(RequestApproval): self.on_request,
                messaging.command_subject_of(DecideApproval): self.on_decide}

    @property
    def handler(self) -> CommandHandler[ApprovalState]:
        """Load → decide → append → audit on the approval aggregate; its events correlate to the run."""
        return CommandHandler(self.store, "approval", _fold, audit=self.audit)

    async def load(self, approval_id: str) -> ApprovalState:
        """The aggregate's state."""
        return (await self.handler.load(approval_id)).state

    async def _append(self, state: ApprovalState, data: EventData, actor: Actor,
                      causation_id: str | None) -> EventEnvelope:
        """Append a system event (a cancel, a timeout: no command) and apply it to ``state``."""
        event = make_event(data, aggregate_id=state.approval_id, seq=state.seq + 1, actor=actor,
                           causation_id=causation_id, correlation_id=state.run_id, aggregate="approval")
        [position] = await self.store.append([event], expected_position=state.position)
        evolve(state, event, position)
        return event

    async def on_request(self, cmd: RequestApproval) -> None:
        """Open the approval (first event of its aggregate); a redelivery finds it open and changes nothing."""

        def decide(state: ApprovalState) -> ApprovalRequested | None:
            if state.exists:  # a second request of the same wait
                return None
            return ApprovalRequested(
                approval_id=cmd.approval_id, run_id=cmd.run_id, procedure_id=cmd.procedure_id,
                procedure_version=cmd.procedure_version, project_id=cmd.project_id, node_id=cmd.node_id,
                node_name=cmd.node_name, prompt=cmd.prompt, context_data=cmd.context_data,
                decision_type=cmd.decision_type, options=cmd.options, input_schema=cmd.input_schema,
                expires_at=cmd.expires_at, timeout_action=cmd.timeout_action, approval_level=cmd.approval_level,
                escalation_contact=cmd.escalation_contact)

        state = _after(await self.handler.handle(cmd.approval_id, cmd, decide, command_type="request_approval",
                                                 correlation_id=cmd.run_id))
        # the run may have ended before this request was handled: then nothing would ever cancel the approval
        ended = await self._run_end(cmd.run_id)
        if ended is not None and state.pending:
            await self.cancel(state.approval_id, ended, causation_id=cmd.command_id)

    async def on_decide(self, cmd: DecideApproval) -> None:
        """Record a principal's decision and resume the run, or reject the command with a stable code."""

        def decide(state: ApprovalState) -> ApprovalDecided:
            status, decision, payload = check_decision(state, cmd.decision, cmd.payload, datetime.now(UTC))
            assert state.run_id is not None
            return ApprovalDecided(
                approval_id=state.approval_id, run_id=state.run_id, status=status, decision=decision,
                decided_by=cmd.actor.render(), decided_at=format_time(utc_now()), comment=cmd.comment,
                payload=payload)

        handled = await self.handler.handle(cmd.approval_id, cmd, decide, command_type="decide_approval",
                                            correlation_id=lambda state: state.run_id)
        if handled.event is not None and handled.event.type == "approval_decided":
            await self._resume(_after(handled), "approval_decision", "human", cmd.actor, cmd.command_id)

    async def _resume(self, state: ApprovalState, reason: str, source: str, actor: Actor,
                      causation_id: str | None) -> None:
        assert state.run_id is not None
        await publish_command(self.js, ResumeRun(actor=actor, causation_id=causation_id, run_id=state.run_id,
                                                 resume_reason=reason, resolution=resolution(state, source)),
                              msg_id=resume_msg_id(state.approval_id))

    # -- the index of pending approvals -----------------------------------------------------------------------

    async def _follow_approvals(self) -> None:
        async for stored in follow(self.js, "lo.evt.approval.>"):
            ev = stored.envelope
            state = self.pending.get(ev.aggregate_id)
            if state is None and ev.type == "approval_requested":
                state = ApprovalState(ev.aggregate_id)
            if state is not None:
                evolve(state, ev, stored.position)
                if state.pending:
                    self.pending[state.approval_id] = state
                    if state.run_id:
                        self.by_run.setdefault(state.run_id, set()).add(state.approval_id)
                else:
                    self._forget(state)
            async with self._indexed:
                self.index_position = stored.position
                self._indexed.notify_all()

    def _forget(self, state: ApprovalState) -> None:
        self.pending.pop(state.approval_id, None)
        if state.run_id and state.run_id in self.by_run:
            self.by_run[state.run_id].discard(state.approval_id)
            if not self.by_run[state.run_id]:
                del self.by_run[state.run_id]

    async def synced(self, timeout: float = 30.0) -> None:
        """Wait until the index has applied every approval event now in the stream."""
        try:
            last = await self.js.get_last_msg(EVENT_STREAM, "lo.evt.approval.>")
        except NotFoundError:
            return
        target = int(last.seq or 0)
        async with self._indexed:
            await asyncio.wait_for(self._indexed.wait_for(lambda: self.index_position >= target), timeout)

    # -- run ends ------------------------------------------------------------------------------------------

    async def _handle_run_end(self, ev: EventEnvelope) -> None:
        """Cancel the pending approvals of a run that ended."""
        await self.synced()
        for approval_id in sorted(self.by_run.get(ev.aggregate_id, set())):
            await self.cancel(approval_id, runs.END_EVENTS.get(ev.type, "ended"), causation_id=ev.event_id)

    async def _run_end(self, run_id: str) -> str | None:
        """How the run ended (``completed``/``failed``/``canceled``/``deleted``) when its last event ends it."""
        try:
            last = await self.js.get_last_msg(EVENT_STREAM, aggregate_filter("run", run_id))
        except NotFoundError:
            return None
        kind = EventEnvelope.model_validate_json(last.data or b"{}").type
        return runs.ENDS.get(kind)

    async def cancel(self, approval_id: str, run_status: str, *, causation_id: str | None) -> None:
        """Cancel a still-pending approval of an ended run (a racing decision or timeout may win instead)."""
        for _ in range(5):
            state = await self.load(approval_id)
            if not state.pending:
                return
            assert state.run_id is not None
            try:
                await self._append(state, ApprovalCanceled(approval_id=approval_id, run_id=state.run_id,
                                                           reason=f"run {run_status}"), ACTOR, causation_id)
                return
            except ConcurrencyError:
                continue
        raise ConcurrencyError(f"approval {approval_id} kept changing while being canceled")

    # -- timeouts ----------------------------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.timer_tick_s)
            stop_if_cancelled()
            if not self.lock.is_leader:
                continue
            try:
                await self.fire_due(datetime.now(UTC))
            except asyncio.CancelledError:
                raise
            except Exception:  # the timer task must outlive any failure: the next round tries again
                log.exception("approval timer round failed")

    async def fire_due(self, now: datetime) -> int:
        """Time out every pending approval whose ``expires_at`` has passed (leader only); returns how many."""
        fired = 0
        for approval_id, state in list(self.unresumed.items()):
            await self._resume(state, "approval_timeout", "timeout", ACTOR, None)
            del self.unresumed[approval_id]
        for approval_id, indexed in list(self.pending.items()):
            expires = indexed.expires()
            if expires is None or expires > now:
                continue
            state = await self.load(approval_id)
            if not state.pending:
                self._forget(state)
                continue
            assert state.run_id is not None
            ended = await self._run_end(state.run_id)
            if ended is not None:
                await self.cancel(approval_id, ended, causation_id=None)
                continue
            status, decision = timeout_outcome(state.timeout_action)
            try:
                await self._append(state, ApprovalTimedOut(
                    approval_id=approval_id, run_id=state.run_id, status=status, decision=decision,
                    decided_at=format_time(now), timeout_action=state.timeout_action), ACTOR, None)
            except ConcurrencyError:
                continue  # a decision or cancel landed meanwhile; the next round re-reads it
            self._forget(state)
            fired += 1
            try:
                await self._resume(state, "approval_timeout", "timeout", ACTOR, None)
            except (NatsError, OSError):  # NATS unavailable: the resume is published again next round
                log.warning("resuming run %s after the timeout of %s failed; retried next round", state.run_id,
                            approval_id, exc_info=True)
                self.unresumed[approval_id] = state
        return fired


def _fold(approval_id: str, history: Sequence[StoredEvent]) -> ApprovalState:
    return fold(approval_id, ((e.envelope, e.position) for e in history))


def _after(handled: Handled[ApprovalState]) -> ApprovalState:
    """The approval after a command: the state it was decided on, with the events it appended now applied (a
    redelivery's state already holds them)."""
    state = handled.state
    if not handled.replayed:
        for event, position in zip(handled.events, handled.positions, strict=True):
            evolve(state, event, position)
    return state


def host(settings: ApprovalsSettings) -> ServiceHost:
    """One approvals replica with its presence key and its /metrics, /health and /ready."""
    service = ApprovalsService(settings)
    return ServiceHost("approvals", VERSION, settings, [service], service.metrics.registry)


async def serve(settings: ApprovalsSettings, *, metrics_port: int | None = None) -> None:
    """Run one approvals replica until cancelled (``metrics_port`` 0: no HTTP endpoint)."""
    await host(settings).serve(metrics_port)
