"""Dispatch of channel steps to registered agents (ckp.md §4.5–4.9, §7.5, §9; api.md §7.3, §8, §15.1, §15.4).

One :class:`AgentDispatcher` per runtime replica, shared by every run it executes:

* a live registry of agents, built by following ``lo.evt.agent.>`` from the start with an ordered consumer and
  :func:`langorch_runtime.agents.evolve_agent`, corrected by the live values in KV ``lo_presence`` (a fresh
  heartbeat's ``status``, the elected prober's consecutive failures);
* candidate selection: channel, ``online``, circuit not open (half-open after
  ``agent_circuit_half_open_s``), a capability named like the action or ``*``; the run's previous agent on the
  channel while it is a healthy, free candidate (affinity, in memory), otherwise the most free lease slots,
  ties round-robin;
* liveness and free slots from local views of KV ``lo_presence`` and ``lo_leases`` that ordered consumers keep
  current (:mod:`langorch_runtime.dispatch_view`; this replica's own lease writes and deletes enter them with the
  revision they got), so choosing needs no read; when the views are not current or show no live candidate with a
  free slot, or a write over a slot they showed free is refused, the liveness and slots are read afresh in one
  concurrent round before anything is concluded (saturated, no executor);
* a lease per attempt: KV ``lo_leases`` key ``<resource_key>.<slot>`` written with a per-key TTL, conditional on the
  revision the slot was seen free at (a stale view cannot double-book a slot: the write is refused), renewed
  (revision-checked) every TTL/3, deleted (revision-checked) when the attempt ends or is cancelled — in the
  background: the step's answer does not wait for it, and a crash before it lands leaves the key to its TTL as a
  crash during the call does; a renewal that finds the key gone or changed aborts the call with ``lease_revoked``;
* the wire: ``POST <base_url>/execute`` for HTTP agents (one shared ``httpx.AsyncClient``) and ``tools/call``
  through the official MCP SDK over streamable HTTP (one session per server and replica) for MCP servers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types
from mcp.shared.exceptions import MCPError
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace

from ckp_core.agents import accepts_work, circuit_state, current_status, probe_failing
from ckp_core.events import ErrorObject, PoolSaturated, format_time
from ckp_core.ids import new_id
from ckp_core.ir import SequencePayload
from ckp_core.subjects import (
    EVENT_STREAM,
    LEASES_BUCKET,
    PRESENCE_BUCKET,
    agent_presence_key,
    agent_probe_key,
    lease_key,
)
from langorch_infra import tracing
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.jetstream import WRONG_LAST_SEQUENCE, connect, decode_message, ensure_topology, through_blips
from langorch_infra.kv import put_with_ttl
from langorch_infra.secret_providers import SecretError, SecretResolver
from langorch_infra.secrets import grant_key, redeem_grants, resolve_grant
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agents import VERSION, AgentState, evolve_agent
from langorch_runtime.deadlines import CANCEL_GRACE_S, consume_outcome, within
from langorch_runtime.dispatch_view import KvView
from langorch_runtime.errors import StepError
from langorch_runtime.machine.ports import ContentArtifacts, Delegated, Dispatcher, DispatchRequest
from langorch_runtime.mcp_session import McpSession
from langorch_runtime.metrics import RuntimeMetrics

log = logging.getLogger(__name__)
BLIP_PATIENCE_S = 60.0  # how long choosing an agent and taking a lease go on trying while NATS is unavailable
ADOPT_EVERY_S = 1.0  # while every slot is held, how often the holders are looked at again (a dead one's are taken)

__all__ = ["AgentDispatcher", "Candidate", "Lease"]

# a kept-alive connection is dropped before common servers' idle timeouts (uvicorn's 5 s) close it under a request
KEEPALIVE_EXPIRY_S = 2.0
# what a request on a connection the peer had closed raises: resent once (connection refused is not one of these)
STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
IN_PROGRESS_DEFAULT_S = 5.0  # api.md §15.1: wait before asking again about a key still executing
MAX_RETRY_AFTER_S = 600.0  # ckp.md §4.8: a Retry-After counts up to 600 s
AFFINITY_LIMIT = 10_000  # (run, channel) choices remembered
PENDING_RELEASE = -1  # the revision in Candidate.free of a slot this replica's release of is still on the wire


def _error(code: str, message: str, *, retryable: bool, **extra: Any) -> StepError:
    details = extra.pop("details", {})
    return StepError(ErrorObject(code=code, message=message, retryable=retryable, details=details, **extra))


def _now() -> datetime:
    return datetime.now(UTC)


def _trace_headers(name: str) -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of one outbound call: the trace of the command the run executes under
    (api.md §1.3), a span id of this call's own."""
    return tracing.outbound_headers(name)


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds, also fractional, or an HTTP date); None when absent/invalid."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - _now()).total_seconds()
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _capability(agent: AgentState, action: str) -> dict[str, Any] | None:
    """The agent's capability serving ``action`` (exact name first, then ``*``), normalised to a dict."""
    wildcard = None
    for raw in agent.fields.get("capabilities") or []:
        cap = {"name": raw, "type": "tool"} if isinstance(raw, str) else raw
        if not isinstance(cap, dict):
            continue
        if cap.get("name") == action:
            return cap
        if cap.get("name") == "*" and wildcard is None:
            wildcard = cap
    return wildcard


@dataclass
class Candidate:
    """An agent able to take the step now, with the free slots of its resource."""

    agent: AgentState
    capability: dict[str, Any]
    free_slots: int
    free: list[tuple[int, int]] = field(default_factory=list)  # (slot, revision to write over) of the free slots
    from_view: bool = False  # chosen from the dispatcher's local view (no read): a failed write reads afresh

    @property
    def agent_id(self) -> str:
        return self.agent.agent_id

    @property
    def resource_key(self) -> str:
        return self.agent.resource_key or self.agent.agent_id

    @property
    def pool_id(self) -> str | None:
        pool = self.agent.fields.get("pool_id")
        return str(pool) if pool else None


@dataclass
class Lease:
    """One held slot: its KV key, current revision and LeaseOut value (api.md §8)."""

    key: str
    revision: int
    value: dict[str, Any]
    revoked: asyncio.Event = field(default_factory=asyncio.Event)


class AgentDispatcher(Dispatcher):
    """Executes dispatched step attempts on registered agents and MCP servers (one per runtime replica).

    Life cycle: ``await start()`` (connects to NATS, replays the agent events, opens the HTTP client), then
    :meth:`dispatch` from any number of runs concurrently, then ``await stop()``. :meth:`forget_run` drops a
    finished run's affinity.
    """

    def __init__(self, settings: RuntimeSettings, *, instance_id: str | None = None,
                 metrics: RuntimeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        if metrics is not None:
            metrics.state.circuits.append(self.open_circuits)
        self.instance = instance_id or settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.owner: str | None = None  # this replica's run owner id (langorch_runtime.ownership), on its leases
        # whether a run owner id is gone from NATS: its leases are taken over (adopt)
        self.holder_gone: Callable[[str], Awaitable[bool]] | None = None
        self.registry: dict[str, AgentState] = {}
        self.registry_position = 0
        self.circuit_opened_at: dict[str, datetime] = {}
        self.affinity: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._round_robin: dict[str, int] = {}
        self._mcp: dict[tuple[str, str | None], McpSession] = {}
        self._mcp_lock = asyncio.Lock()
        self._releases: dict[str, asyncio.Task[None]] = {}  # lease key → its release still on the wire
        self._nc: NATS | None = None
        self._follower: asyncio.Task[None] | None = None
        self._registry_changed = asyncio.Event()
        self.presence_view: KvView | None = None  # agents' heartbeats and probes, followed (started by start())
        self.leases_view: KvView | None = None  # lease slots, followed (started by start())
        self.grant_key = grant_key(settings.auth_secret_key.get_secret_value())
        self.secrets = SecretResolver(settings)  # the service gives it its metadata records

    # -- life cycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._nc = await connect(self.settings.nats_url, f"langorch-runtime-dispatch-{self.instance}",
                                 self.settings)
        self.js: JetStreamContext = self._nc.jetstream()
        await ensure_topology(self.js, replicas=self.settings.nats_replicas)
        self.leases: KeyValue = await self.js.key_value(LEASES_BUCKET)
        self.presence: KeyValue = await self.js.key_value(PRESENCE_BUCKET)
        self.http = httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": f"langorch-runtime/{VERSION}"},
                                      timeout=httpx.Timeout(self.settings.agent_timeout_s, connect=10.0),
                                      limits=httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                                          keepalive_expiry=KEEPALIVE_EXPIRY_S))
        self._follower = asyncio.create_task(self._follow_registry(), name="agent-dispatch-registry")
        self.presence_view = KvView(self.js, PRESENCE_BUCKET, ("agent.>", "probe.>"))
        self.leases_view = KvView(self.js, LEASES_BUCKET)
        await asyncio.gather(self.sync_registry(timeout_s=10.0), self.presence_view.start(timeout_s=10.0),
                             self.leases_view.start(timeout_s=10.0))

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await self._follower
        for view in (self.presence_view, self.leases_view):
            if view is not None:
                await view.stop()
        if self._releases:  # leases of the last calls: deleted now rather than left to their TTL
            await asyncio.wait(list(self._releases.values()), timeout=5.0)
        for session in list(self._mcp.values()):
            await session.close()
        self._mcp.clear()
        with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
            await self.http.aclose()
        if self._nc is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await self._nc.close()

    def open_circuits(self) -> list[tuple[str, str]]:
        """(``agent``|``mcp``, agent id) of every agent whose circuit is open now (for the gauge)."""
        out = []
        for agent_id in list(self.circuit_opened_at):
            agent = self.registry.get(agent_id)
            if agent is not None and agent.exists and agent.circuit_open:
                out.append(("mcp" if agent.protocol == "mcp" else "agent", agent_id))
        return out

    def forget_run(self, run_id: str) -> None:
        """Drop the affinity of a run that ended."""
        for key in [k for k in self.affinity if k[0] == run_id]:
            del self.affinity[key]

    # -- registry ---------------------------------------------------------------------------------------------

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
                if ev.type == "agent_circuit_opened":
                    self.circuit_opened_at[ev.aggregate_id] = ev.occurred_at
                elif ev.type in ("agent_circuit_closed", "agent_registered", "agent_removed"):
                    self.circuit_opened_at.pop(ev.aggregate_id, None)
                self.registry_position = stored.position
                self._registry_changed.set()
        finally:
            with contextlib.suppress(NatsError, OSError):  # the connection may be closed or draining already
                await sub.unsubscribe()

    async def sync_registry(self, timeout_s: float = 2.0) -> bool:
        """Wait until the registry has applied every agent event now in ``LO_EVT`` (True when it has)."""
        try:
            head = int((await self.js.get_last_msg(EVENT_STREAM, "lo.evt.agent.>")).seq or 0)
        except NotFoundError:
            return True
        deadline = time.monotonic() + timeout_s
        while self.registry_position < head:
            if time.monotonic() > deadline:
                return False
            self._registry_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._registry_changed.wait(), max(0.01, deadline - time.monotonic()))
        return True

    async def _kv_json(self, kv: KeyValue, key: str) -> dict[str, Any] | None:
        try:
            entry = await kv.get(key)
            value = json.loads(entry.value or b"{}")
        except (KeyNotFoundError, KeyDeletedError, NotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    async def _live(self, agent: AgentState) -> bool:
        """Whether dispatch may use the agent now: ``ckp_core.agents``' liveness rule over the registry, corrected
        by KV ``lo_presence`` (a fresh heartbeat's status, the elected prober's failures), read afresh."""
        heartbeat, probe = await asyncio.gather(self._kv_json(self.presence, agent_presence_key(agent.agent_id)),
                                                self._kv_json(self.presence, agent_probe_key(agent.agent_id)))
        return self._alive(agent, heartbeat, probe)

    def _live_in_view(self, view: KvView, agent: AgentState, now: float) -> bool:
        """:meth:`_live` over the followed ``lo_presence`` (no read)."""
        return self._alive(agent, view.json(agent_presence_key(agent.agent_id), now),
                           view.json(agent_probe_key(agent.agent_id), now))

    def _alive(self, agent: AgentState, heartbeat: dict[str, Any] | None, probe: dict[str, Any] | None) -> bool:
        said = heartbeat.get("status") if heartbeat is not None else None
        status = current_status(agent.status, said if isinstance(said, str) else None)
        failing = probe is not None and probe_failing(bool(probe.get("ok", True)),
                                                      int(probe.get("consecutive_failures", 0)),
                                                      self.settings.agent_circuit_failures)
        circuit = circuit_state(agent.circuit_open, self.circuit_opened_at.get(agent.agent_id), _now(),
                                self.settings.agent_circuit_half_open_s)
        return accepts_work(status, circuit, failing)

    async def slot_states(self, resource_key: str, limit: int) -> list[tuple[int, int]]:
        """The free slots of ``resource_key`` (KV ``lo_leases``) as ``(slot, revision)``: the revision a conditional
        create writes over (0 for a key with no message, else its delete or expiry marker), so taking a slot is one
        round trip (nats-py's ``create`` over a delete marker takes three)."""
        await self._released(resource_key, limit)

        async def state(slot: int) -> tuple[int, int] | None:
            try:
                entry = await self.leases.get(lease_key(resource_key, slot))
            except (KeyNotFoundError, KeyDeletedError) as missing:
                return slot, int(getattr(getattr(missing, "entry", None), "revision", 0) or 0)
            except NotFoundError:
                return slot, 0
            if not entry.value:  # the server's marker of a key that expired by its TTL
                return slot, int(entry.revision or 0)
            return None

        return [free for free in await asyncio.gather(*(state(s) for s in range(limit))) if free is not None]

    def _in_view(self, matching: list[tuple[AgentState, dict[str, Any]]],
                 limits: dict[str, int]) -> list[Candidate] | None:
        """The candidates as the followed ``lo_presence`` and ``lo_leases`` show them (no read); None when the views
        are not current."""
        presence, leases = self.presence_view, self.leases_view
        if presence is None or leases is None or not presence.current or not leases.current:
            return None
        now = time.monotonic()
        free: dict[str, list[tuple[int, int]]] = {}
        out = []
        for a, cap in matching:
            if not self._live_in_view(presence, a, now):
                continue
            rk = a.resource_key or a.agent_id
            if rk not in free:
                slots = [(slot, leases.free_revision(lease_key(rk, slot), now)) for slot in range(limits[rk])]
                # a slot this replica is releasing counts as free (after the others): its run never finds it held
                free[rk] = [(slot, rev) for slot, rev in slots if rev is not None] + [
                    (slot, PENDING_RELEASE) for slot, rev in slots
                    if rev is None and lease_key(rk, slot) in self._releases]
            out.append(Candidate(a, cap, len(free[rk]), free[rk], from_view=True))
        return out

    async def candidates(self, channel: str, action: str, *, fresh: bool = False) -> list[Candidate]:
        """Agents that may take ``action`` on ``channel`` now, with the free slots of their resources.

        From the followed views when they are current and show a live candidate with a free slot (a slot whose
        release by this replica is still on the wire counts, as :data:`PENDING_RELEASE`); otherwise, or with
        ``fresh``, the liveness of every matching agent and the slots of their resources are read in one concurrent
        round."""
        matching = [(a, cap) for a in list(self.registry.values())
                    if a.exists and str(a.fields.get("channel", "")).lower() == channel
                    and (cap := _capability(a, action)) is not None]
        if not matching:
            return []
        limits: dict[str, int] = {}
        for a, _ in matching:
            limits.setdefault(a.resource_key or a.agent_id, max(1, a.concurrency_limit))
        if not fresh:
            seen = self._in_view(matching, limits)
            if seen and any(c.free_slots for c in seen):
                return seen
        live, states = await asyncio.gather(asyncio.gather(*(self._live(a) for a, _ in matching)),
                                            asyncio.gather(*(self.slot_states(rk, n) for rk, n in limits.items())))
        free = dict(zip(limits, states, strict=True))
        out = []
        for (a, cap), ok in zip(matching, live, strict=True):
            if ok:
                slots = free[a.resource_key or a.agent_id]
                out.append(Candidate(a, cap, len(slots), slots))
        return out

    def rank(self, run_id: str, channel: str, found: list[Candidate]) -> list[Candidate]:
        """Candidates in order of preference: affinity while free, then most free slots, ties round-robin."""
        ordered = sorted(found, key=lambda c: c.agent_id)
        counter = self._round_robin.get(channel, 0)
        self._round_robin[channel] = counter + 1
        if ordered:
            shift = counter % len(ordered)
            ordered = ordered[shift:] + ordered[:shift]
        ordered.sort(key=lambda c: -c.free_slots)  # stable: equal free slots keep the rotated order
        preferred = self.affinity.get((run_id, channel))
        for i, c in enumerate(ordered):
            if c.agent_id == preferred and c.free_slots > 0:
                ordered.insert(0, ordered.pop(i))
                break
        return ordered

    def _remember(self, run_id: str, channel: str, agent_id: str) -> None:
        self.affinity[(run_id, channel)] = agent_id
        self.affinity.move_to_end((run_id, channel))
        while len(self.affinity) > AFFINITY_LIMIT:
            self.affinity.popitem(last=False)

    # -- leases -----------------------------------------------------------------------------------------------

    def _lease_value(self, c: Candidate, slot: int, request: DispatchRequest, lease_id: str,
                     acquired_at: str) -> dict[str, Any]:
        now = _now()
        return {"lease_id": lease_id, "resource_key": c.resource_key, "slot": slot, "agent_id": c.agent_id,
                "pool_id": c.pool_id, "run_id": request.run_id or None, "node_id": request.node.id,
                "step_id": request.step_id, "idempotency_key": request.idempotency_key or None,
                "holder": self.instance, "acquired_at": acquired_at,
                "renewed_at": format_time(now),
                "expires_at": format_time(now + timedelta(seconds=self.settings.lease_ttl_s)),
                **({"owner": self.owner} if self.owner else {})}

    def _wrote(self, key: str, revision: int, data: bytes | None, ttl_s: float | None = None) -> None:
        """This replica's own write (``data``) or delete (None) of a lease key, into the followed view at once."""
        if self.leases_view is not None:
            self.leases_view.apply(key, revision, data, ttl_s)

    async def _put_lease(self, key: str, value: dict[str, Any], ttl: float, last: int) -> int:
        data = json.dumps(value).encode()
        written = await put_with_ttl(self.js, LEASES_BUCKET, key, data, ttl, last=last)
        self._wrote(key, written, data, max(1, round(ttl)))
        return written

    async def try_acquire(self, c: Candidate, request: DispatchRequest) -> Lease | None:
        """Take a free slot of the candidate's resource, or None when every slot is held: a write conditional on the
        revision the slot had when it was seen free (:meth:`slot_states` or the followed view), so a slot taken
        meanwhile is skipped."""
        ttl = max(1, round(self.settings.lease_ttl_s))
        acquired_at = format_time(_now())
        for slot, revision in c.free:
            key = lease_key(c.resource_key, slot)
            if revision == PENDING_RELEASE:  # this replica's own release: the view learns its marker when it lands
                if (releasing := self._releases.get(key)) is not None:
                    await asyncio.wait([releasing])
                found = self.leases_view.free_revision(key, time.monotonic()) if self.leases_view else None
                if found is None:
                    continue  # the release did not delete it (revoked, taken over, failed): held still
                revision = found
            value = self._lease_value(c, slot, request, new_id(), acquired_at)
            try:
                written = await self._put_lease(key, value, ttl, revision)
            except KeyWrongLastSequenceError:
                continue  # taken (or released again) since it was read
            except asyncio.CancelledError:
                # the write may have landed although its answer is lost (a step canceled with its run, a branch
                # with its parallel node): the slot is let go in the background if it holds this lease, rather
                # than held until its TTL
                self._in_background(key, self._release_if_written(key, value))
                raise
            return Lease(key, written, value)
        return None

    async def _release_if_written(self, key: str, value: dict[str, Any]) -> None:
        """Delete ``key`` if it holds the lease ``value`` (written by a request whose answer was cut off)."""
        try:
            entry = await self.leases.get(key)
            held = json.loads(entry.value or b"{}")
        except (KeyNotFoundError, KeyDeletedError, NotFoundError, ValueError):
            return
        except (NatsError, OSError):
            log.warning("releasing lease %s failed; it expires by TTL", key, exc_info=True)
            return
        if isinstance(held, dict) and held.get("lease_id") == value["lease_id"]:
            await self.release(Lease(key, int(entry.revision or 0), value))

    async def adopt(self, c: Candidate, request: DispatchRequest) -> Lease | None:
        """A slot still held for this very attempt — same run and idempotency key — by the replica that executed
        it before a crash (or by this replica before it restarted under the same instance id): the run was
        redelivered here, so that execution is gone (one replica executes a run at a time), and the attempt re-sent
        with the same key is the same call for the agent (§7.4). Or a slot held by a replica gone from NATS
        (``holder_gone``, its run ownership's answer): its call died with it. Taking the slot
        over (revision-checked) spares the recovered run a wait of up to the lease TTL for its own lease, and the
        other runs a wait for slots nobody uses."""
        if (not request.run_id or not request.idempotency_key) and self.holder_gone is None:
            return None
        ttl = max(1, round(self.settings.lease_ttl_s))
        for slot in range(max(1, c.agent.concurrency_limit)):
            key = lease_key(c.resource_key, slot)
            try:
                entry = await self.leases.get(key)
                held = json.loads(entry.value or b"{}")
            except (KeyNotFoundError, KeyDeletedError, NotFoundError, ValueError):
                continue
            if not isinstance(held, dict):
                continue
            same = bool(request.run_id and request.idempotency_key) and held.get("run_id") == request.run_id and \
                held.get("idempotency_key") == request.idempotency_key
            owner = held.get("owner")
            if not same and not (self.holder_gone is not None and isinstance(owner, str) and owner != self.owner
                                 and await self.holder_gone(owner)):
                continue
            value = self._lease_value(c, slot, request, new_id(), format_time(_now())) | {
                "adopted_from": held.get("holder")}
            try:
                revision = await self._put_lease(key, value, ttl, int(entry.revision or 0))
            except KeyWrongLastSequenceError:
                continue
            log.info("lease %s on %s: taken over from %s for the recovered attempt %s", value["lease_id"], key,
                     held.get("holder"), request.idempotency_key)
            return Lease(key, revision, value)
        return None

    async def _renew_forever(self, lease: Lease, *, wait_first: bool = True) -> None:
        """Renew every TTL/3 (revision-checked; at once unless ``wait_first``); return when the key is gone or holds
        something else."""
        interval = self.settings.lease_ttl_s / 3
        while True:
            if wait_first:
                await asyncio.sleep(interval)
                stop_if_cancelled()
            wait_first = True
            now = _now()
            value = lease.value | {"renewed_at": format_time(now), "expires_at": format_time(
                now + timedelta(seconds=self.settings.lease_ttl_s))}
            try:
                lease.revision = await self._put_lease(lease.key, value, self.settings.lease_ttl_s, lease.revision)
                lease.value = value
            except KeyWrongLastSequenceError:
                log.warning("lease %s on %s was force-released", lease.value["lease_id"], lease.key)
                lease.revoked.set()
                return
            except asyncio.CancelledError:
                raise
            except (NatsError, OSError):  # NATS unavailable or slow: the next renewal may succeed
                log.warning("renewing lease %s failed; trying again", lease.key, exc_info=True)

    async def release(self, lease: Lease) -> None:
        """Delete the lease key unless it changed hands (revision-checked). A renewal canceled with the call may
        still have landed after the revision this side knows: the key is read again, and deleted at its new
        revision while it still holds this lease."""
        if lease.revoked.is_set():
            return
        for _ in range(3):
            try:
                self._wrote(lease.key, await self._delete_lease(lease.key, lease.revision), None)
                return
            except (KeyNotFoundError, NotFoundError):
                return
            except KeyWrongLastSequenceError:
                pass  # renewed meanwhile (or taken over): read again below
            except APIError:
                log.warning("releasing lease %s failed; it expires by TTL", lease.key, exc_info=True)
                return
            except (NatsError, OSError):
                log.warning("releasing lease %s failed; it expires by TTL", lease.key, exc_info=True)
                return
            try:
                entry = await self.leases.get(lease.key)
                held = json.loads(entry.value or b"{}")
            except (KeyNotFoundError, KeyDeletedError, NotFoundError, ValueError):
                return
            except (NatsError, OSError):
                log.warning("releasing lease %s failed; it expires by TTL", lease.key, exc_info=True)
                return
            if not isinstance(held, dict) or held.get("lease_id") != lease.value["lease_id"]:
                return  # taken over or released meanwhile: not this side's to delete
            lease.revision = int(entry.revision or 0)

    async def _delete_lease(self, key: str, last: int) -> int:
        """Delete a lease key conditionally on its revision (``last``), as nats-py's ``KeyValue.delete`` does, but
        answering the delete marker's revision: this replica's view learns the slot free at once, with the revision
        the next conditional write takes it over at."""
        headers = {"KV-Operation": "DEL", "Nats-Expected-Last-Subject-Sequence": str(last)}
        try:
            ack = await self.js.publish(f"$KV.{LEASES_BUCKET}.{key}", b"", headers=headers)
        except APIError as exc:
            if exc.err_code in (WRONG_LAST_SEQUENCE, 10164):
                raise KeyWrongLastSequenceError(description=exc.description) from exc
            raise
        return int(ack.seq)

    def _release_soon(self, lease: Lease) -> None:
        """Release in the background: the step's answer does not wait for the delete. A crash before it lands
        leaves the key until its TTL, as a crash during the call does. Its own runs never find their last slot still
        held: the followed view counts the slot free (:data:`PENDING_RELEASE`, taken once the delete lands, after
        the slots free already), and a fresh read of the resource waits for it (:meth:`_released`)."""
        self._in_background(lease.key, self.release(lease))

    def _in_background(self, key: str, releasing: Coroutine[Any, Any, None]) -> None:
        """A release of ``key`` as a task of its own, which :meth:`settled` (and a write of the key) waits for."""
        task = asyncio.create_task(releasing, name=f"lease-release {key}")
        task.add_done_callback(consume_outcome)
        self._releases[key] = task
        task.add_done_callback(lambda t: self._releases.pop(key, None) if self._releases.get(key) is t else None)

    async def settled(self) -> None:
        """Wait until every lease released so far is deleted (for a reader of ``lo_leases`` right after a call)."""
        if self._releases:
            await asyncio.wait(list(self._releases.values()))

    async def _released(self, resource_key: str, limit: int) -> None:
        """Wait for this replica's releases of ``resource_key``'s slots still on the wire."""
        if self._releases:
            pending = [t for s in range(limit) if (t := self._releases.get(lease_key(resource_key, s))) is not None]
            if pending:
                await asyncio.wait(pending)

    def _held(self, c: Candidate, lease: Lease, started: float) -> tuple[Candidate, Lease]:
        """A slot was taken: record the wait and the active lease of its pool."""
        if self.metrics is not None:
            pool = c.pool_id or c.agent_id
            self.metrics.lease_wait.labels(pool).observe(time.monotonic() - started)
            self.metrics.leases_active.labels(pool).inc()
        return c, lease

    async def acquire(self, request: DispatchRequest, channel: str) -> tuple[Candidate, Lease]:
        """A candidate and a held slot of its resource, waiting while every candidate is full (§7.5)."""
        started = time.monotonic()
        deadline = started + self.settings.lease_wait_timeout_s
        delay = 0.02
        saturated = False
        synced = False
        adopt_again = 0.0
        fresh = False
        while True:  # NATS briefly unavailable (a restart, a failover) is waited out, never abandons the attempt
            found = await through_blips("agent candidates", partial(self.candidates, channel, request.action,
                                                                    fresh=fresh), BLIP_PATIENCE_S)
            fresh = False
            if not found and not synced:
                synced = True  # an agent registered a moment ago may not have reached the registry yet
                if await self.sync_registry():
                    found = await self.candidates(channel, request.action)
            if not found:
                raise _error("no_executor", f"no executor for action '{request.action}' on channel '{channel}': "
                             "no online agent with a matching capability", retryable=True,
                             details={"channel": channel, "action": request.action})
            ranked = self.rank(request.run_id, channel, found)
            for c in ranked:
                if c.free_slots <= 0:
                    continue
                # a write that landed although its answer was lost leaves the slot held for this attempt: adopted
                lease = await through_blips("lease", partial(self.try_acquire, c, request), BLIP_PATIENCE_S)
                if lease is not None:
                    return self._held(c, lease, started)
            if any(c.from_view for c in ranked):
                fresh = True  # the view was behind a slot taken elsewhere: read afresh before concluding anything
                continue
            if not saturated or (self.holder_gone is not None and time.monotonic() >= adopt_again):
                # every slot is held: one may still be held for this very attempt, or by a replica that died
                adopt_again = time.monotonic() + ADOPT_EVERY_S
                for c in ranked:
                    lease = await through_blips("lease", partial(self.adopt, c, request), BLIP_PATIENCE_S)
                    if lease is not None:
                        return self._held(c, lease, started)
            if not saturated:
                saturated = True
                top = ranked[0]
                if self.metrics is not None:
                    self.metrics.pool_saturation.labels(top.pool_id or top.agent_id).inc()
                if request.emit is not None:
                    await request.emit(PoolSaturated(
                        node_id=request.node.id, step_id=request.step_id, frame=request.frame,
                        attempt=request.attempt, agent_id=top.agent_id, channel=channel,
                        resource_key=top.resource_key, pool_id=top.pool_id))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _error("lease_wait_timeout", f"no free lease slot for action '{request.action}' on channel "
                             f"'{channel}' within {self.settings.lease_wait_timeout_s:g} s", retryable=True,
                             details={"channel": channel, "action": request.action,
                                      "resource_keys": sorted({c.resource_key for c in ranked})})
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.5)

    # -- dispatch ---------------------------------------------------------------------------------------------

    enforces_step_timeout = True  # the step's timeout covers the call only, not the wait for a lease (§4.9)
    announces_agent = True  # step_started carries the agent chosen (ckp.md §8)

    async def dispatch(self, request: DispatchRequest) -> Any:
        channel = (request.channel or request.node.channel or "").lower()
        if request.affinity and (request.run_id, channel) not in self.affinity:
            self._remember(request.run_id, channel, request.affinity)  # persisted in the run's state (§4.5)
        candidate, lease = await self.acquire(request, channel)
        self._remember(request.run_id, channel, candidate.agent_id)
        request.agent_id = candidate.agent_id
        try:
            stop_if_cancelled()  # a lease write's wait_for may have swallowed it: the slot is released below
            if request.on_selected is not None:
                await request.on_selected(candidate.agent_id, self.binding_of(candidate))
            call = self._timed(request, self._call(candidate, request, channel))
            return await self._under_lease(lease, self._measured(candidate, channel, call))
        finally:
            if self.metrics is not None:
                self.metrics.leases_active.labels(candidate.pool_id or candidate.agent_id).dec()
            self._release_soon(lease)

    @staticmethod
    def binding_of(c: Candidate) -> str:
        """The step's binding once its agent is chosen (ckp.md §7.1): MCP tool, workflow or HTTP tool."""
        if c.agent.protocol == "mcp":
            return "mcp_tool"
        return "agent_workflow" if c.capability.get("type", "tool") == "workflow" else "agent_http"

    async def _measured(self, c: Candidate, channel: str, call: Coroutine[Any, Any, Any]) -> Any:
        """The timed call, counted in ``langorch_agent_requests_total`` / ``langorch_mcp_requests_total`` (api.md
        §13.1): one request per dispatched attempt, whatever retries of ``in_progress`` it took on the wire. A call
        cancelled from outside (run canceled, lease revoked) has no outcome and is not counted."""
        metrics = self.metrics
        if metrics is None:
            return await call
        started = time.monotonic()
        outcome: str | None = None
        try:
            result = await call
            outcome = "success"
            return result
        except Delegated:
            outcome = "success"  # the agent accepted the async workflow step
            raise
        except StepError as exc:
            outcome = _call_outcome(exc.error)
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            if outcome is not None:
                self._count(c, channel, outcome, time.monotonic() - started)

    def _count(self, c: Candidate, channel: str, outcome: str, seconds: float) -> None:
        assert self.metrics is not None
        if c.agent.protocol == "mcp":
            self.metrics.mcp_requests.labels(channel, outcome).inc()
        else:
            self.metrics.agent_requests.labels(channel, outcome).inc()
            self.metrics.agent_duration.labels(channel).observe(seconds)

    async def _timed(self, request: DispatchRequest, call: Any) -> Any:
        if request.timeout_ms is None:
            return await call
        try:
            return await within(call, request.timeout_ms / 1000, f"step {request.step_id}")
        except TimeoutError:
            raise _error("step_timeout", f"step '{request.step_id}' timed out after {request.timeout_ms} ms",
                         retryable=True, details={"timeout_ms": request.timeout_ms}) from None

    async def _under_lease(self, lease: Lease, call: Any) -> Any:
        """Run ``call`` while renewing the lease; abort it with ``lease_revoked`` when the lease is taken. The
        renewal task starts when the first renewal is due (TTL/3): a shorter call, the usual one, runs alone."""
        call_task: asyncio.Task[Any] = asyncio.ensure_future(call)
        renew_task: asyncio.Task[None] | None = None
        try:
            await asyncio.wait({call_task}, timeout=self.settings.lease_ttl_s / 3)
            if not call_task.done():
                renew_task = asyncio.create_task(self._renew_forever(lease, wait_first=False))
                await asyncio.wait({call_task, renew_task}, return_when=asyncio.FIRST_COMPLETED)
            if call_task.done():
                return call_task.result()
            if renew_task is not None and renew_task.done() and renew_task.exception() is not None:
                raise renew_task.exception()  # type: ignore[misc]
            raise _error("lease_revoked", f"lease {lease.value['lease_id']} on {lease.key} was force-released "
                         "during the call", retryable=True,
                         details={"lease_id": lease.value["lease_id"], "resource_key": lease.value["resource_key"],
                                  "slot": lease.value["slot"]})
        finally:
            tasks = [t for t in (call_task, renew_task) if t is not None]
            running = [t for t in tasks if not t.done()]
            for task in running:
                task.cancel()
            if running:
                # the cancelled tasks' CancelledError (or last failure) is theirs; a call that does not stop promptly
                # on cancellation is left to end in the background (deadlines.within) rather than holding the step
                await asyncio.wait(running, timeout=CANCEL_GRACE_S)
            for task in tasks:
                task.add_done_callback(consume_outcome)

    async def _call(self, c: Candidate, request: DispatchRequest, channel: str) -> Any:
        kind = c.capability.get("type", "tool")
        if c.agent.protocol == "mcp":
            if kind == "workflow" and request.dispatch_mode != "sync":
                raise _error("dispatch_failed", "async workflow dispatch needs an HTTP agent and a callback",
                             retryable=False, details={"agent_id": c.agent_id, "action": request.action})
            return await self._call_mcp(c, request)  # the MCP SDK makes the client spans of its requests
        with tracing.client_span("POST", {  # HTTP client semantic conventions, and which agent did what
                "http.request.method": "POST", "url.full": f"{c.agent.base_url.rstrip('/')}/execute",
                "server.address": httpx.URL(c.agent.base_url).host, "langorch.agent_id": c.agent_id,
                "langorch.action": request.action}):
            if kind == "workflow" and request.dispatch_mode != "sync":
                if request.callback is None:
                    raise _error("dispatch_failed", "async workflow dispatch needs an HTTP agent and a callback",
                                 retryable=False, details={"agent_id": c.agent_id, "action": request.action})
                return await self._call_async(c, request, channel)
            params = dict(request.params)
            if kind == "workflow":
                params["_workflow_context"] = self.workflow_context(request, channel)
            return await self._call_http(c, request, params, "sync" if kind == "workflow" else "tool")

    async def _call_async(self, c: Candidate, request: DispatchRequest, channel: str) -> Any:
        """Async workflow dispatch (ckp.md §4.6, api.md §15.2): POST ``/execute`` with the callback and wait at most
        10 s for the acceptance (tried 3 times, 1 s and 2 s apart, same key); acceptance raises
        :class:`Delegated` (the interpreter suspends the step until the callback), else ``dispatch_failed``."""
        callback = request.callback
        assert callback is not None
        params = dict(request.params)
        params["_workflow_context"] = self.workflow_context(request, channel)
        params["callback_url"] = f"{callback.url}?token={callback.token}"
        url = f"{c.agent.base_url.rstrip('/')}/execute"
        body = {"action": request.action, "params": params, "run_id": request.run_id, "node_id": request.node.id,
                "step_id": request.step_id, "attempt": request.attempt, "idempotency_key": request.idempotency_key,
                "deadline_at": callback.expires_at, "dispatch_mode": "async",
                "callback": {"url": callback.url, "token": callback.token, "expires_at": callback.expires_at}}
        headers = {"Idempotency-Key": request.idempotency_key, "X-Run-ID": request.run_id,
                   "X-Node-ID": request.node.id, "X-Step-ID": request.step_id,
                   "X-LangOrch-Attempt": str(request.attempt), **tracing.inject({}),
                   **(await self._auth_header(c.agent))}
        where = {"agent_id": c.agent_id, "url": url}
        last: str = ""
        asked_back: float | None = None  # the Retry-After of a 409 in_progress, which replaces the back-off
        for pause in (0.0, 1.0, 2.0):
            if asked_back is not None:
                pause, asked_back = asked_back, None
            if pause:
                await asyncio.sleep(pause)
            try:  # the acceptance, body included, within the acceptance timeout (httpx's own is per read)
                accept_s = self.settings.agent_async_accept_timeout_s
                r = await within(self.http.post(url, json=body, headers=headers, timeout=accept_s), accept_s,
                                 f"POST {url}")
            except (httpx.HTTPError, TimeoutError) as exc:
                last = f"{type(exc).__name__}"
                continue
            trace.get_current_span().set_attribute("http.response.status_code", r.status_code)
            envelope = _json_object(r)
            state = envelope.get("status") if envelope is not None else None
            if r.status_code == 202 or (200 <= r.status_code < 300 and state == "accepted"):
                raise Delegated(callback.delegation_id, agent_id=c.agent_id, agent_url=c.agent.base_url)
            if r.status_code in (408, 429) or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code == 409 and envelope is not None and envelope.get("error_code") == "in_progress":
                wait = _retry_after_s(r.headers.get("retry-after"))  # the same key is still being dispatched
                asked_back = min(IN_PROGRESS_DEFAULT_S if wait is None else wait,
                                 self.settings.agent_async_accept_timeout_s)
                last = "HTTP 409 in_progress"
                continue
            return self._interpret(c, r, envelope, where)  # a direct answer or an error ends the dispatch
        raise _error("dispatch_failed", f"agent {c.agent_id} did not accept the async workflow step after 3 tries "
                     f"({last})", retryable=True, details=where | {"tries": 3})

    def workflow_context(self, request: DispatchRequest, channel: str) -> dict[str, Any]:
        """``params._workflow_context`` of a workflow capability (ckp.md §4.6)."""
        steps = request.node.payload.steps if isinstance(request.node.payload, SequencePayload) else []
        current = next((s for s in steps if s.step_id == request.step_id), None)
        return {
            "dispatch_mode": request.dispatch_mode, "channel": channel, "run_id": request.run_id,
            "procedure_id": request.procedure_id, "node_id": request.node.id, "current_step_id": request.step_id,
            "current_step_action": current.action if current else request.action,
            "current_step_params": request.params,
            "node_steps": [{"step_id": s.step_id, "action": s.action, "params": s.params.source,
                            "timeout_ms": s.timeout_ms, "wait_ms": s.wait_ms, "wait_after_ms": s.wait_after_ms,
                            "workflow_dispatch_mode": s.dispatch_mode, "output_variable": s.output_variable}
                           for s in steps]}

    async def _redeem(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The grants in an MCP tool's arguments replaced by their values, read from the providers now."""
        async def value(claims: dict[str, Any]) -> str:
            return await resolve_grant(self.secrets, claims)

        try:
            redeemed: dict[str, Any] = await redeem_grants(dict(params), self.grant_key, value)
        except SecretError as exc:
            raise _error(exc.code, exc.message, retryable=exc.retryable,
                         details={"secret_name": exc.name, "provider": exc.provider, "reason": exc.reason}) from None
        return redeemed

    async def _auth_header(self, agent: AgentState) -> dict[str, str]:
        """``Authorization: Bearer <secret>`` when the agent's registration names a secret, read from its provider
        now (the name's record, else the default providers)."""
        auth = agent.fields.get("auth") or {}
        ref = auth.get("secret_ref") if isinstance(auth, Mapping) else None
        if not ref or auth.get("type", "bearer") == "none":
            return {}
        try:
            secret = await self.secrets.resolve(str(ref))
        except SecretError as exc:
            raise _error(exc.code, f"secret '{ref}' named by agent {agent.agent_id}'s auth: {exc.reason}",
                         retryable=exc.retryable, details={"agent_id": agent.agent_id, "secret_ref": ref,
                                                           "provider": exc.provider}) from None
        return {"Authorization": f"Bearer {secret}"}

    def _timeout_s(self, request: DispatchRequest, default_s: float) -> tuple[float, bool]:
        """The wire timeout and whether it is the binding default (the interpreter enforces a step's own)."""
        if request.timeout_ms is not None:
            return request.timeout_ms / 1000 + 1.0, False  # slack: the interpreter's wait_for fires first
        return default_s, True

    async def _call_http(self, c: Candidate, request: DispatchRequest, params: dict[str, Any],
                         dispatch_mode: str) -> Any:
        timeout_s, binding_default = self._timeout_s(request, self.settings.agent_timeout_s)
        deadline_at = request.deadline_at or format_time(_now() + timedelta(seconds=timeout_s))
        body = {"action": request.action, "params": params, "run_id": request.run_id, "node_id": request.node.id,
                "step_id": request.step_id, "attempt": request.attempt, "idempotency_key": request.idempotency_key,
                "deadline_at": deadline_at, "dispatch_mode": dispatch_mode, "callback": None}
        headers = {"Idempotency-Key": request.idempotency_key, "X-Run-ID": request.run_id,
                   "X-Node-ID": request.node.id, "X-Step-ID": request.step_id,
                   "X-LangOrch-Attempt": str(request.attempt), **tracing.inject({}),
                   **(await self._auth_header(c.agent))}
        url = f"{c.agent.base_url.rstrip('/')}/execute"
        where = {"agent_id": c.agent_id, "url": url}
        ends = time.monotonic() + timeout_s
        resent = False
        while True:
            remaining = ends - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(request, timeout_s, where)
            try:  # httpx's timeout is per read: within() bounds the whole exchange, a trickling body included
                r = await within(self.http.post(url, json=body, headers=headers, timeout=remaining), remaining,
                                 f"POST {url}")
            except STALE_CONNECTION_ERRORS as exc:
                if resent:
                    raise _error("agent_unavailable", f"agent {c.agent_id} could not be reached: "
                                 f"{type(exc).__name__}", retryable=True,
                                 details=where | {"reason": str(exc)[:300]}) from None
                # a kept-alive connection the agent closed just as it was reused: sent again at once, on a new
                # connection, with the same Idempotency-Key (an agent that got the first one answers from its record)
                resent = True
                log.info("agent %s: connection closed under the request (%s); sending key %s again", c.agent_id,
                         type(exc).__name__, request.idempotency_key)
                continue
            except (httpx.TimeoutException, TimeoutError):
                if binding_default:
                    raise self._timed_out(request, timeout_s, where) from None
                raise _error("agent_unavailable", f"agent {c.agent_id} did not answer in time", retryable=True,
                             details=where | {"reason": "timeout"}) from None
            except httpx.HTTPError as exc:
                raise _error("agent_unavailable", f"agent {c.agent_id} could not be reached: "
                             f"{type(exc).__name__}", retryable=True, details=where | {"reason": str(exc)[:300]}) \
                    from None
            trace.get_current_span().set_attribute("http.response.status_code", r.status_code)
            envelope = _json_object(r)
            if r.status_code == 409 and envelope is not None and envelope.get("error_code") == "in_progress":
                wait = _retry_after_s(r.headers.get("retry-after"))
                wait = IN_PROGRESS_DEFAULT_S if wait is None else wait
                if time.monotonic() + wait >= ends:
                    raise self._timed_out(request, timeout_s, where) if binding_default else _error(
                        "agent_unavailable", f"agent {c.agent_id} still runs key {request.idempotency_key}",
                        retryable=True, details=where | {"retry_after_ms": int(wait * 1000)})
                log.info("agent %s: key %s in progress, asking again in %.1f s", c.agent_id,
                         request.idempotency_key, wait)
                await asyncio.sleep(wait)
                continue
            return self._interpret(c, r, envelope, where)

    def _timed_out(self, request: DispatchRequest, timeout_s: float, where: dict[str, Any]) -> StepError:
        return _error("step_timeout", f"step '{request.step_id}' timed out after {timeout_s:g} s (binding default)",
                      retryable=True, details=where | {"timeout_ms": int(timeout_s * 1000)})

    def _interpret(self, c: Candidate, r: httpx.Response, envelope: dict[str, Any] | None,
                   where: dict[str, Any]) -> Any:
        status = r.status_code
        retry_after = _retry_after_s(r.headers.get("retry-after"))
        if status in (408, 429) or status >= 500:
            details = where | ({"retry_after_ms": int(retry_after * 1000)} if retry_after is not None else {})
            raise _error("agent_unavailable", f"agent {c.agent_id} answered HTTP {status}", retryable=True,
                         http_status=status, details=details)
        if 400 <= status < 500:
            message = (envelope or {}).get("error") or f"agent {c.agent_id} answered HTTP {status}"
            error_code = (envelope or {}).get("error_code")  # any body may come with a 4xx: keep a string code only
            raise _error(f"agent_http_{status}", str(message), retryable=False, http_status=status,
                         error_code=error_code if isinstance(error_code, str) else None, details=where)
        if status == 202:
            raise _error("agent_protocol_error", f"agent {c.agent_id} accepted a synchronous call (HTTP 202)",
                         retryable=False, http_status=status, details=where)
        if not 200 <= status < 300:
            raise _error("agent_protocol_error", f"agent {c.agent_id} answered HTTP {status}", retryable=False,
                         http_status=status, details=where)
        kind = envelope.get("status") if envelope is not None else None
        if kind == "success":
            result = envelope.get("result") if envelope is not None else None
            return {} if result is None else result
        if kind == "error" and envelope is not None:
            wrong = [f for f, t in (("error", str), ("error_code", str), ("error_type", str), ("retryable", bool))
                     if envelope.get(f) is not None and not isinstance(envelope.get(f), t)]
            if wrong and self.settings.agent_strict_response:
                raise _error("agent_protocol_error", f"agent {c.agent_id} answered an error envelope whose "
                             f"{', '.join(wrong)} {'has' if len(wrong) == 1 else 'have'} the wrong type",
                             retryable=False, http_status=status, details=where | {"body": r.text[:500]})
            error_type = envelope.get("error_type")
            error_code = envelope.get("error_code")
            message = envelope.get("error") or f"agent {c.agent_id} reported an error"
            raise _error("agent_error", str(message), retryable=envelope.get("retryable") is True,
                         type=error_type if isinstance(error_type, str) else None,
                         error_code=error_code if isinstance(error_code, str)
                         else None, http_status=status, details=where)
        if kind == "accepted":
            raise _error("agent_protocol_error", f"agent {c.agent_id} accepted a synchronous call", retryable=False,
                         http_status=status, details=where)
        if envelope is not None and kind is None and not self.settings.agent_strict_response:
            return envelope
        raise _error("agent_protocol_error", f"agent {c.agent_id} answered without the response envelope",
                     retryable=False, http_status=status, details=where | {"body": r.text[:500]})

    # -- MCP --------------------------------------------------------------------------------------------------

    async def _mcp_session(self, agent: AgentState) -> McpSession:
        headers = await self._auth_header(agent)
        key = (agent.base_url, headers.get("Authorization"))
        async with self._mcp_lock:
            session = self._mcp.get(key)
            if session is None or session.broken:
                if session is not None:
                    await session.close()
                session = McpSession(agent.base_url, headers)
                self._mcp[key] = session
        await session.ready(self.settings.mcp_timeout_s)
        return session

    async def _call_mcp(self, c: Candidate, request: DispatchRequest) -> Any:
        timeout_s, binding_default = self._timeout_s(request, self.settings.mcp_timeout_s)
        # the SDK adds the trace context of this call (a client span of the current one) to ``_meta`` (SEP-414);
        # its transport runs in the session's own task, so _stamp_request copies it from there into the headers
        meta = {"langorch/run_id": request.run_id, "langorch/idempotency_key": request.idempotency_key}
        where = {"agent_id": c.agent_id, "url": c.agent.base_url, "tool": request.action}
        for again in (True, False):
            session: McpSession | None = None
            try:
                session = await self._mcp_session(c.agent)
                arguments = await self._redeem(request.params)  # MCP tools get values
                result = await session.call(request.action, arguments, meta, timeout_s)
            except MCPError as exc:
                if again and session is not None and session.lost:
                    await self._drop_mcp(c.agent)  # 404 on our session id: the server forgot it; initialise once
                    continue
                retryable = exc.code in (mcp_types.INTERNAL_ERROR, mcp_types.CONNECTION_CLOSED)
                if exc.code == mcp_types.REQUEST_TIMEOUT and binding_default:
                    raise _error("step_timeout", f"MCP tool '{request.action}' timed out after {timeout_s:g} s",
                                 retryable=True, details=where) from None
                if exc.code == mcp_types.CONNECTION_CLOSED:
                    await self._drop_mcp(c.agent)
                raise _error("mcp_error", f"MCP server {c.agent_id}: {exc.message}", retryable=retryable,
                             error_code=str(exc.code), details=where | {"jsonrpc_code": exc.code}) from None
            except StepError:
                raise
            except ValueError as exc:  # pydantic's ValidationError: a result that is not a CallToolResult
                raise _error("mcp_error", f"MCP server {c.agent_id} answered tools/call with an invalid result: "
                             f"{type(exc).__name__}", retryable=False,
                             details=where | {"reason": str(exc)[:300]}) from None
            except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, httpx2.HTTPError,
                    OSError, RuntimeError, ExceptionGroup) as exc:
                await self._drop_mcp(c.agent)
                raise _error("mcp_error", f"MCP server {c.agent_id} could not be reached: {type(exc).__name__}",
                             retryable=True, details=where | {"reason": str(exc)[:300]}) from None
            return _tool_output(c.agent_id, result, where)
        raise AssertionError("unreachable")

    async def _drop_mcp(self, agent: AgentState) -> None:
        async with self._mcp_lock:
            for key in [k for k in self._mcp if k[0] == agent.base_url]:
                await self._mcp.pop(key).close()


def _call_outcome(error: ErrorObject) -> str:
    """The ``outcome`` label of a failed agent or MCP call (api.md §13.1)."""
    if error.code == "step_timeout":
        return "timeout"
    if error.code == "agent_protocol_error":
        return "protocol_error"
    details = error.details or {}
    if details.get("reason") == "timeout" or details.get("jsonrpc_code") == mcp_types.REQUEST_TIMEOUT:
        return "timeout"
    if error.code in ("agent_unavailable", "mcp_error", "dispatch_failed") and error.http_status is None:
        code = details.get("jsonrpc_code")
        return "error" if code is not None and code != mcp_types.CONNECTION_CLOSED else "transport_error"
    return "error"


def _json_object(r: httpx.Response) -> dict[str, Any] | None:
    try:
        value = r.json()
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _tool_output(agent_id: str, result: mcp_types.CallToolResult, where: dict[str, Any]) -> Any:
    """The step output of a ``tools/call`` result (api.md §15.4); ``image`` and ``resource`` items are artifacts
    (:class:`ContentArtifacts`: stored by the interpreter, linked in the output where they were)."""
    texts = [item.text for item in result.content if isinstance(item, mcp_types.TextContent)]
    if result.is_error:
        message = "\n".join(texts) or f"MCP tool '{where['tool']}' failed"
        raise _error("mcp_tool_error", message[:2000], retryable=False, details=where)
    single_text = len(result.content) == 1 and bool(texts)
    value: Any
    if result.structured_content is not None:
        value = result.structured_content
    elif single_text:
        try:
            value = json.loads(texts[0])
        except ValueError:
            value = texts[0]
    else:
        value = [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in result.content]
    in_list = result.structured_content is None and not single_text
    artifacts = [spec | {"at": i if in_list else None} for i, item in enumerate(result.content)
                 if (spec := _content_artifact(item)) is not None]
    return ContentArtifacts(value, artifacts) if artifacts else value


def _content_artifact(item: Any) -> dict[str, Any] | None:
    """The artifact spec (ckp.md §4.12) of an MCP ``image``, ``resource`` or ``resource_link`` content item."""
    if isinstance(item, mcp_types.ImageContent):
        extension = item.mime_type.split("/")[-1].split("+")[0] or "bin"
        return {"type": "image", "kind": "image", "name": f"image.{extension}", "mime_type": item.mime_type,
                "content_base64": item.data}
    if isinstance(item, mcp_types.EmbeddedResource):
        contents = item.resource
        name = str(contents.uri).rstrip("/").rsplit("/", 1)[-1] or str(contents.uri)
        if isinstance(contents, mcp_types.BlobResourceContents):
            data = contents.blob
        else:
            data = base64.b64encode(contents.text.encode()).decode()
        return {"type": "resource", "kind": "file", "name": name, "mime_type": contents.mime_type,
                "content_base64": data}
    if isinstance(item, mcp_types.ResourceLink):
        return {"type": "resource_link", "kind": "file", "name": item.name, "uri": str(item.uri),
                "mime_type": item.mime_type}
    return None
