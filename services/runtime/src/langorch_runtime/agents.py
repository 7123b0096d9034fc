"""Agents and leases in the runtime (api.md §7, §8): the agent aggregate's command handling, the health poller
run by ONE elected replica, and force-release of lease keys.

Commands ``lo.cmd.agent.{register,update,remove}`` and ``lo.cmd.lease.release`` arrive on their own durable
consumer (``runtime-agents``), separate from run execution. Every decision reads the aggregate's events from
``LO_EVT`` and appends with its expected position. The poller keeps a registry of all agents by following
``lo.evt.agent.>`` and probes ``GET <base_url>/health`` only while this replica holds ``leader.agent_health`` in
KV ``lo_locks``; results go to KV ``lo_presence`` (``probe.<agent_id>``), events only on changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from ckp_core.agents import probe_failing, status_after_probe
from ckp_core.commands import RegisterAgent, ReleaseLease, RemoveAgent, UpdateAgent
from ckp_core.errors import CommandRefused, ConcurrencyError
from ckp_core.events import (
    Actor,
    AgentCapabilitiesSynced,
    AgentCircuitClosed,
    AgentCircuitOpened,
    AgentRegistered,
    AgentRemoved,
    AgentStatusChanged,
    AgentTokenRotated,
    AgentUpdated,
    EventData,
    EventEnvelope,
    LeaseForceReleased,
    format_time,
    make_event,
)
from ckp_core.eventstore import StoredEvent
from ckp_core.subjects import (
    COMMAND_STREAM,
    EVENT_STREAM,
    LEASES_BUCKET,
    PRESENCE_BUCKET,
    agent_presence_key,
    agent_probe_key,
)
from langorch_infra import messaging
from langorch_infra.audit import AuditWriter
from langorch_infra.bus import BusMetrics
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.handling import CommandHandler
from langorch_infra.hosting import bus_checks
from langorch_infra.jetstream import JetStreamEventStore, decode_message, ensure_topology
from langorch_infra.kv import LeaderLock, put_with_ttl
from langorch_infra.settings import RuntimeSettings

log = logging.getLogger(__name__)

CONSUMER = messaging.AGENT_COMMANDS.durable
ACTOR = Actor.system("runtime")
VERSION = "0.1.0"


# -- the agent aggregate (pure) -------------------------------------------------------------------------


@dataclass
class AgentState:
    """One agent as its events describe it (``exists`` is False before registration and after removal)."""

    agent_id: str
    exists: bool = False
    status: str = "offline"
    base_url: str = ""
    protocol: str = "http"
    resource_key: str = ""
    concurrency_limit: int = 1
    circuit_open: bool = False
    seq: int = 0
    position: int = 0
    fields: dict[str, Any] = field(default_factory=dict)


def evolve_agent(state: AgentState, ev: EventEnvelope, position: int) -> None:
    """Apply one event of the agent aggregate to ``state`` (in place)."""
    state.seq, state.position = ev.seq, position
    d = ev.data
    if ev.type == "agent_registered":
        state.exists, state.circuit_open = True, False
        state.fields = dict(d)
        state.status, state.base_url, state.protocol = d.get("status", "online"), d["base_url"], d.get("protocol",
                                                                                                        "http")
        state.resource_key, state.concurrency_limit = d["resource_key"], int(d.get("concurrency_limit", 1))
    elif ev.type == "agent_updated":
        changes = d.get("changes", {})
        state.fields.update(changes)
        state.status = changes.get("status", state.status)
        state.base_url = changes.get("base_url", state.base_url)
        state.protocol = changes.get("protocol", state.protocol)
        state.resource_key = changes.get("resource_key", state.resource_key)
        state.concurrency_limit = int(changes.get("concurrency_limit", state.concurrency_limit))
    elif ev.type == "agent_status_changed":
        state.status = d["status"]
    elif ev.type == "agent_capabilities_synced":
        state.fields["capabilities"] = list(d.get("capabilities", []))
    elif ev.type == "agent_circuit_opened":
        state.circuit_open = True
    elif ev.type == "agent_circuit_closed":
        state.circuit_open = False
    elif ev.type == "agent_removed":
        state.exists = False


def shares_limit_conflict(agents: Iterable[AgentState], agent_id: str, resource_key: str, limit: int) -> str | None:
    """Another agent on ``resource_key`` with a different ``concurrency_limit`` (api.md §7.1), if any."""
    for other in agents:
        if other.exists and other.agent_id != agent_id and other.resource_key == resource_key \
                and other.concurrency_limit != limit:
            return other.agent_id
    return None


class FollowedAgents(Protocol):
    """A registry of every agent kept current by following ``lo.evt.agent.>`` (with :func:`evolve_agent`)."""

    registry: dict[str, AgentState]
    registry_position: int


# -- the service -------------------------------------------------------------------------------------------


class AgentService:
    """Agent and lease commands plus the elected health poller of one runtime replica."""

    def __init__(self, settings: RuntimeSettings, *, bus: BusMetrics | None = None,
                 followed: FollowedAgents | None = None) -> None:
        self.settings = settings
        self.bus = bus
        # ``followed``: the registry another component of this process already builds from lo.evt.agent.> (the
        # runtime's dispatcher), used instead of following the agent events a second time from sequence 0
        self.followed = followed
        self.instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.nc: NATS | None = None
        self.registry: dict[str, AgentState] = {}
        self.registry_position = 0
        self.polls = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self.broker = messaging.broker(settings.nats_url, f"langorch-runtime-agents-{self.instance}", bus,
                                       settings)
        self.commands = messaging.Subscription(self.broker, messaging.AGENT_COMMANDS).handle(self.handlers)

    async def start(self) -> None:
        self.nc = await messaging.connect(self.broker)
        self.js: JetStreamContext = self.nc.jetstream()
        await ensure_topology(self.js, audit_retention_days=self.settings.audit_retention_days,
                              replicas=self.settings.nats_replicas)
        self.store = JetStreamEventStore(self.js)
        self.audit = AuditWriter(self.js)
        self.presence = await self.js.key_value(PRESENCE_BUCKET)
        self.leases = await self.js.key_value(LEASES_BUCKET)
        self.lock = LeaderLock(self.js, "agent_health", self.instance, self.settings.leader_lock_ttl_s)
        self.http = httpx.AsyncClient(follow_redirects=False, timeout=self.settings.agent_probe_timeout_s,
                                      headers={"User-Agent": f"langorch-runtime/{VERSION}",
                                               "X-LangOrch-Instance": self.instance})

    def leader_of(self) -> list[str]:
        """The leader locks this replica holds now (the runtime's presence lists them)."""
        lock: LeaderLock | None = getattr(self, "lock", None)
        return [lock.name] if lock is not None and lock.held else []

    async def ready_checks(self) -> dict[str, str]:
        """NATS connected, the command and event streams and the agent buckets present."""
        return await bus_checks(self.nc, getattr(self, "js", None), (EVENT_STREAM, COMMAND_STREAM),
                                (PRESENCE_BUCKET, LEASES_BUCKET))

    async def run(self) -> None:
        """Handle commands, follow the registry, hold the leader lock and poll health — until cancelled."""
        self._tasks = [asyncio.create_task(c) for c in
                       (*([self._follow_registry()] if self.followed is None else []), self.lock.keep(),
                        self._poll_forever())]
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
        with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
            await self.http.aclose()
        with contextlib.suppress(Exception):  # shutdown: a lost connection has nothing left to close
            await messaging.close(self.broker, self.nc)

    # -- commands ----------------------------------------------------------------------------------------

    @property
    def handlers(self) -> dict[str, messaging.Handler]:
        """The function of each agent and lease command subject (a ``ConcurrencyError`` naks the command: another
        writer of the aggregate landed first, and the redelivery decides again)."""
        return {messaging.command_subject_of(t): f for t, f in (
            (RegisterAgent, self.on_register), (UpdateAgent, self.on_update), (RemoveAgent, self.on_remove),
            (ReleaseLease, self.on_release_lease))}

    @property
    def agents(self) -> CommandHandler[AgentState]:
        """Load → decide → append → audit on the agent aggregate."""
        return CommandHandler(self.store, "agent", _fold_agent, audit=self.audit)

    @property
    def leases_handler(self) -> CommandHandler[None]:
        """Load → decide → append → audit on the lease aggregate (whose events only record force-releases)."""
        return CommandHandler(self.store, "lease", lambda lease_id, history: None, audit=self.audit)

    async def _append(self, aggregate: str, aggregate_id: str, seq: int, position: int, data: EventData,
                      actor: Actor, causation_id: str | None) -> tuple[EventEnvelope, int]:
        """Append a system event (health: no command)."""
        event = make_event(data, aggregate_id=aggregate_id, seq=seq + 1, actor=actor, causation_id=causation_id,
                           aggregate=aggregate)
        [appended] = await self.store.append([event], expected_position=position)
        return event, appended

    async def _synced_registry(self) -> list[AgentState]:
        """The registry once it has applied every agent event now in the stream (for cross-agent checks)."""
        try:
            last = await self.js.get_last_msg(EVENT_STREAM, "lo.evt.agent.>")
            head = int(last.seq or 0)
        except NotFoundError:
            head = 0
        source: FollowedAgents = self.followed or self
        for _ in range(100):
            if source.registry_position >= head:
                break
            await asyncio.sleep(0.02)
        return list(source.registry.values())

    async def on_register(self, cmd: RegisterAgent) -> None:
        async def decide(state: AgentState) -> AgentRegistered:
            if state.exists:
                raise CommandRefused("agent_exists", f"agent {cmd.agent_id} is already registered")
            other = shares_limit_conflict(await self._synced_registry(), cmd.agent_id, cmd.resource_key,
                                          cmd.concurrency_limit)
            if other is not None:
                raise CommandRefused("resource_limit_conflict", f"agent {other} shares resource_key "
                                     f"{cmd.resource_key} with another concurrency_limit", conflicting_agent=other)
            return AgentRegistered(
                agent_id=cmd.agent_id, name=cmd.name, channel=cmd.channel, protocol=cmd.protocol,
                base_url=cmd.base_url, status="online", concurrency_limit=cmd.concurrency_limit,
                resource_key=cmd.resource_key, pool_id=cmd.pool_id, capabilities=cmd.capabilities, labels=cmd.labels,
                auth=cmd.auth or {"type": "none", "secret_ref": None}, token_sha256=cmd.token_sha256)

        await self.agents.handle(cmd.agent_id, cmd, decide, command_type="register_agent")

    async def on_update(self, cmd: UpdateAgent) -> None:
        async def decide(state: AgentState) -> EventData:
            if not state.exists:
                raise CommandRefused("not_found", f"agent {cmd.agent_id} not found", resource="agent")
            if cmd.operation == "sync_capabilities":
                return AgentCapabilitiesSynced(agent_id=cmd.agent_id, capabilities=cmd.capabilities or [])
            if cmd.operation == "rotate_token" and cmd.token_sha256:
                return AgentTokenRotated(agent_id=cmd.agent_id, token_sha256=cmd.token_sha256)
            if set(cmd.changes) == {"status"}:
                return AgentStatusChanged(agent_id=cmd.agent_id, from_status=state.status,
                                          status=cmd.changes["status"], reason=cmd.reason)
            if "resource_key" in cmd.changes or "concurrency_limit" in cmd.changes:
                other = shares_limit_conflict(
                    await self._synced_registry(), cmd.agent_id,
                    cmd.changes.get("resource_key", state.resource_key),
                    int(cmd.changes.get("concurrency_limit", state.concurrency_limit)))
                if other is not None:
                    raise CommandRefused("resource_limit_conflict", f"agent {other} shares the resource_key "
                                         "with another concurrency_limit", conflicting_agent=other)
            return AgentUpdated(agent_id=cmd.agent_id, changes=cmd.changes)

        await self.agents.handle(cmd.agent_id, cmd, decide, command_type="update_agent")

    async def on_remove(self, cmd: RemoveAgent) -> None:
        def decide(state: AgentState) -> AgentRemoved:
            if not state.exists:
                raise CommandRefused("not_found", f"agent {cmd.agent_id} not found", resource="agent")
            return AgentRemoved(agent_id=cmd.agent_id)

        handled = await self.agents.handle(cmd.agent_id, cmd, decide, command_type="remove_agent")
        if not handled.replayed and handled.accepted:
            with contextlib.suppress(KeyNotFoundError, NotFoundError):
                await self.presence.delete(agent_presence_key(cmd.agent_id))

    async def on_release_lease(self, cmd: ReleaseLease) -> None:
        """Force-release: the event decides, then the key is deleted revision-checked (redelivery repeats only
        the delete). A key that now holds another lease is left alone: that slot was re-acquired legitimately."""

        async def decide(_: None) -> LeaseForceReleased:
            lease = await self._lease_at(cmd.key)
            if lease is None or lease[0].get("lease_id") != cmd.lease_id:
                raise CommandRefused("not_found", f"lease {cmd.lease_id} not found", resource="lease")
            value = lease[0]
            return LeaseForceReleased(lease_id=cmd.lease_id, resource_key=str(value.get("resource_key", "")),
                                      slot=value.get("slot"), run_id=value.get("run_id"), reason=cmd.reason)

        handled = await self.leases_handler.handle(cmd.lease_id, cmd, decide, command_type="release_lease")
        if handled.rejected and not handled.replayed:
            return
        for _ in range(5):
            lease = await self._lease_at(cmd.key)
            if lease is None or lease[0].get("lease_id") != cmd.lease_id:
                return
            try:
                await self.leases.delete(cmd.key, last=lease[1])
                return
            except KeyWrongLastSequenceError:
                continue  # renewed in between: same lease, newer revision

    async def _lease_at(self, key: str) -> tuple[dict[str, Any], int] | None:
        try:
            entry = await self.leases.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        try:
            value = json.loads(entry.value or b"{}")
        except ValueError:
            return None
        return (value, int(entry.revision or 0)) if isinstance(value, dict) else None

    # -- registry and health ----------------------------------------------------------------------------------

    async def _follow_registry(self) -> None:
        sub = await self.js.subscribe("lo.evt.agent.>", ordered_consumer=True, stream=EVENT_STREAM,
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        try:
            while True:
                stop_if_cancelled()
                stored = decode_message(await sub.next_msg(timeout=None))
                ev = stored.envelope
                state = self.registry.setdefault(ev.aggregate_id, AgentState(ev.aggregate_id))
                evolve_agent(state, ev, stored.position)
                self.registry_position = stored.position
        finally:
            with contextlib.suppress(NatsError, OSError):  # the connection may be closed or draining already
                await sub.unsubscribe()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.agent_health_interval_s)
            stop_if_cancelled()
            if not self.lock.is_leader:
                continue
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the health task must outlive any failure: the next round tries again
                log.exception("agent health round failed")

    async def poll_once(self) -> None:
        """Probe every registered agent once (leader only)."""
        self.polls += 1
        agents = [a for a in (self.followed or self).registry.values() if a.exists]
        await asyncio.gather(*(self._probe(a) for a in agents))

    async def _probe(self, agent: AgentState) -> None:
        ok, error = await self._check_health(agent)
        previous = await self._last_probe(agent.agent_id)
        failures = 0 if ok else int(previous.get("consecutive_failures", 0)) + 1
        now = format_time(datetime.now(UTC))
        record = {"agent_id": agent.agent_id, "ok": ok, "error": error, "consecutive_failures": failures,
                  "last_probe_at": now, "last_success_at": now if ok else previous.get("last_success_at"),
                  "prober": self.instance}
        ttl = max(self.settings.agent_health_interval_s * 10, self.settings.agent_heartbeat_interval_s * 3)
        await put_with_ttl(self.js, PRESENCE_BUCKET, agent_probe_key(agent.agent_id), json.dumps(record).encode(),
                           ttl)
        if probe_failing(ok, failures, self.settings.agent_circuit_failures) and not agent.circuit_open:
            await self._system_event(agent, AgentCircuitOpened(agent_id=agent.agent_id, consecutive_failures=failures,
                                                               last_error=error))
        elif ok and agent.circuit_open:
            await self._system_event(agent, AgentCircuitClosed(agent_id=agent.agent_id))
        if agent.status == "draining":
            return  # an operator's choice; health does not override it (nor does status_after_probe)
        heartbeat_fresh = await self._heartbeat_fresh(agent.agent_id)
        wanted = status_after_probe(agent.status, ok, failures, self.settings.agent_circuit_failures, heartbeat_fresh)
        if wanted is not None:
            reason = "health probe succeeded" if ok else ("heartbeat" if heartbeat_fresh else f"health: {error}")
            await self._system_event(agent, AgentStatusChanged(agent_id=agent.agent_id, from_status=agent.status,
                                                               status=wanted, reason=reason))

    async def _check_health(self, agent: AgentState) -> tuple[bool, str | None]:
        base = agent.base_url.rstrip("/")
        try:
            if agent.protocol == "mcp":
                # MCP has no /health; a JSON-RPC ping that the server answers below 500 shows it is serving
                r = await self.http.post(base, json={"jsonrpc": "2.0", "id": "health", "method": "ping"},
                                         headers={"Accept": "application/json, text/event-stream"})
                return (r.status_code < 500), (None if r.status_code < 500 else f"HTTP {r.status_code}")
            r = await self.http.get(f"{base}/health")
        except httpx.TimeoutException:
            return False, "timeout"
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}"[:200]
        return (r.status_code == 200), (None if r.status_code == 200 else f"HTTP {r.status_code}")

    async def _last_probe(self, agent_id: str) -> dict[str, Any]:
        try:
            entry = await self.presence.get(agent_probe_key(agent_id))
            value = json.loads(entry.value or b"{}")
            return value if isinstance(value, dict) else {}
        except (KeyNotFoundError, NotFoundError, ValueError):
            return {}

    async def _heartbeat_fresh(self, agent_id: str) -> bool:
        try:
            await self.presence.get(agent_presence_key(agent_id))
        except (KeyNotFoundError, NotFoundError):
            return False
        return True

    async def _system_event(self, agent: AgentState, data: EventData) -> None:
        try:
            event, position = await self._append("agent", agent.agent_id, agent.seq, agent.position, data, ACTOR,
                                                 None)
        except ConcurrencyError:
            log.info("agent %s changed while probing; its health is re-judged next round", agent.agent_id)
        else:
            # apply at once, so a second decision of this round (status after circuit) appends at the new head
            # and the next round does not repeat the event before the registry catches up
            evolve_agent(agent, event, position)


def _fold_agent(agent_id: str, history: Sequence[StoredEvent]) -> AgentState:
    state = AgentState(agent_id)
    for stored in history:
        evolve_agent(state, stored.envelope, stored.position)
    return state


async def serve(settings: RuntimeSettings) -> None:
    """Run the agent/lease side of one runtime replica until cancelled."""
    service = AgentService(settings)
    await service.start()
    try:
        await service.run()
    finally:
        await service.stop()
