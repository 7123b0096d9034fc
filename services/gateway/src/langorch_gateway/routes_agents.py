"""Agents, pools and leases (api.md §7, §8). The runtime owns agent aggregates: mutations are commands
``lo.cmd.agent.*`` awaited until the ``agents`` projection applied them. The runtime also owns the leases and
judges liveness: an agent's live figures (last heartbeat, last probe, active leases) and the leases themselves are
asked of it over NATS (``ckp_core.queries``). Heartbeats arrive here and are written to the shared presence
bucket (docs/decisions.md, "Agent heartbeats"); the circuit's half-open reading is ``ckp_core.agents``' rule.

Literal paths (``probe-capabilities``, ``pools``, ``bootstrap``, ``heartbeat``) are declared before
``/api/agents/{agent_id}``.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ckp_core import runs
from ckp_core.agents import circuit_state
from ckp_core.commands import RegisterAgent, ReleaseLease, RemoveAgent, UpdateAgent
from ckp_core.events import format_time
from ckp_core.queries import AgentsLive, AgentsLiveReply, LeaseRecord, Leases, LeasesReply
from ckp_core.subjects import PRESENCE_BUCKET, agent_presence_key
from langorch_gateway import auditing, auth, deps, users, views
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import accepted_headers, min_position, pending, raise_if_rejected, ryw, send
from langorch_gateway.outbound import check_url, normalise_capabilities, probe_capabilities
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import Limit, Offset, Order, Where, fetch_page
from langorch_gateway.runtime_queries import ask
from langorch_infra.kv import put_with_ttl
from langorch_infra.settings import GatewaySettings

router = APIRouter()

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ID_RE = re.compile(ID_PATTERN)
AgentId = Annotated[str, Field(pattern=ID_PATTERN)]
Status = Literal["online", "offline", "draining"]
Protocol = Literal["http", "mcp"]


class AgentAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "bearer"] = "none"
    secret_ref: str | None = Field(None, pattern=ID_PATTERN)


class AgentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId | None = None
    name: str = Field(min_length=1, max_length=200)
    channel: AgentId
    base_url: str = Field(min_length=1, max_length=2000)
    protocol: Protocol = "http"
    concurrency_limit: int = Field(1, ge=1, le=10_000)
    resource_key: AgentId | None = None
    pool_id: AgentId | None = None
    capabilities: list[str | dict[str, Any]] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    auth: AgentAuth | None = None


class AgentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    status: Status | None = None
    base_url: str | None = Field(None, min_length=1, max_length=2000)
    protocol: Protocol | None = None
    concurrency_limit: int | None = Field(None, ge=1, le=10_000)
    pool_id: AgentId | None = None
    capabilities: list[str | dict[str, Any]] | None = None
    labels: dict[str, str] | None = None
    auth: AgentAuth | None = None


class HeartbeatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: AgentId
    status: Status = "online"
    cpu_percent: float | None = Field(None, ge=0, le=100)
    memory_percent: float | None = Field(None, ge=0, le=100)
    active_tasks: int | None = Field(None, ge=0)
    agent_version: str | None = Field(None, max_length=100)


def _db(request: Request) -> asyncpg.Pool:
    return clients(request).pool


def _settings(request: Request) -> GatewaySettings:
    return clients(request).settings


def _new_token() -> str:
    return "lo_agt_" + secrets.token_urlsafe(32)


def _capabilities(raw: list[Any], field: str, settings: GatewaySettings) -> list[dict[str, Any]]:
    """Normalised capabilities; every bad entry reported at ``capabilities.<i>.<member>``."""
    errors: dict[str, list[str]] = {}
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        try:
            [cap] = normalise_capabilities([item])
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                message = "Unknown field" if err["type"] == "extra_forbidden" else str(err["msg"])
                errors.setdefault(f"{field}.{i}.{loc}" if loc else f"{field}.{i}", []).append(message)
            continue
        if cap["name"] == "*" and settings.agent_require_explicit_capabilities:
            errors.setdefault(f"{field}.{i}.name", []).append(
                "The wildcard capability needs LANGORCH_AGENT_REQUIRE_EXPLICIT_CAPABILITIES=false")
        out.append(cap)
    if errors:
        raise ApiProblem("validation_failed", f"{len(errors)} capability fields failed validation", errors=errors)
    return out


# -- live figures and leases, asked of the runtime -------------------------------------------------------------


async def read_leases(request: Request, query: Leases | None = None) -> list[LeaseRecord]:
    """The live leases matching ``query`` (all without one), ascending ``acquired_at``; the runtime answers."""
    return (await ask(request, query or Leases(), LeasesReply)).leases


async def render_agents(request: Request, rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    live = {a.agent_id: a for a in (await ask(request, AgentsLive(agent_ids=[r["agent_id"] for r in rows]),
                                              AgentsLiveReply)).agents} if rows else {}
    half_open_after_s = _settings(request).agent_circuit_half_open_s
    now = datetime.now(UTC)
    out = []
    for row in rows:
        figures = live.get(row["agent_id"])
        heartbeat = figures.heartbeat if figures is not None else None
        probe = figures.probe if figures is not None else None
        opened = row["circuit_open_at"]
        auth = views._json(row["auth"]) or {}
        out.append({
            "agent_id": row["agent_id"], "name": row["name"], "channel": row["channel"], "protocol": row["protocol"],
            "base_url": row["base_url"], "status": row["status"], "concurrency_limit": row["concurrency_limit"],
            "resource_key": row["resource_key"], "pool_id": row["pool_id"],
            "capabilities": views._json(row["capabilities"]) or [], "labels": views._json(row["labels"]) or {},
            "auth": {"type": auth.get("type", "none"), "secret_ref": auth.get("secret_ref")},
            "circuit_state": circuit_state(row["circuit_state"] == "open", opened, now, half_open_after_s),
            "consecutive_failures": max(row["consecutive_failures"], probe.consecutive_failures if probe else 0),
            "circuit_open_at": format_time(opened) if opened else None,
            "last_heartbeat_at": heartbeat.last_heartbeat_at if heartbeat else None,
            "last_probe_at": probe.last_probe_at if probe else None,
            "cpu_percent": heartbeat.cpu_percent if heartbeat else None,
            "memory_percent": heartbeat.memory_percent if heartbeat else None,
            "active_leases": figures.active_leases if figures is not None else 0,
            "agent_version": heartbeat.agent_version if heartbeat else None,
            "registered_by": row["registered_by"], "created_at": format_time(row["created_at"]),
            "updated_at": format_time(row["updated_at"]),
        })
    return out


async def _row(request: Request, agent_id: str) -> asyncpg.Record:
    row = await _db(request).fetchrow("SELECT * FROM agents WHERE agent_id = $1", agent_id)
    if row is None:
        raise ApiProblem("not_found", f"agent {agent_id} not found", resource="agent")
    return row


async def _agent_response(request: Request, agent_id: str, status: int = 200, extra: dict[str, Any] | None = None,
                          headers: dict[str, str] | None = None) -> JSONResponse:
    [body] = await render_agents(request, [await _row(request, agent_id)])
    return JSONResponse(body | (extra or {}), status_code=status, headers=headers)


async def _limit_conflict(request: Request, agent_id: str, resource_key: str, limit: int) -> None:
    other = await _db(request).fetchval(
        """SELECT agent_id FROM agents WHERE resource_key = $1 AND agent_id <> $2 AND concurrency_limit <> $3
           LIMIT 1""", resource_key, agent_id, limit)
    if other is not None:
        raise ApiProblem("resource_limit_conflict", f"agent {other} shares resource_key {resource_key} with another "
                         "concurrency_limit", conflicting_agent=other)


async def _update(request: Request, command: UpdateAgent, command_type: str,
                  extra: dict[str, Any] | None = None) -> JSONResponse:
    outcome = await send(request, "agent", command.agent_id, command, command_type,
                         f"/api/agents/{command.agent_id}")
    if outcome is None:
        return pending(command.command_id, command_type)
    raise_if_rejected(outcome)
    headers = accepted_headers(command.command_id, outcome.position, await ryw(request, outcome.position))
    if extra is not None:
        return JSONResponse(extra, headers=headers)
    return await _agent_response(request, command.agent_id, headers=headers)


# -- collection and literal paths -----------------------------------------------------------------------------


@router.get("/api/agents")
async def list_agents(
    principal: auth.Viewer,
    request: Request,
    db: deps.Pool,
    channel: str | None = None,
    status: Status | None = None,
    pool_id: str | None = None,
    protocol: Protocol | None = None,
    capability: str | None = None,
    sort: Literal["agent_id", "updated_at"] = "agent_id",
    order: Order = "asc",
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of agents with live presence, probe and lease figures."""
    headers = await min_position(request)
    where = Where()
    where.eq("channel", channel.lower() if channel else None)
    where.eq("status", status)
    where.eq("pool_id", pool_id)
    where.eq("protocol", protocol)
    if capability:
        where.add(f"capabilities @> {where.arg(json.dumps([{'name': capability}]))}::jsonb")
    order_sql = f"agent_id {order}" if sort == "agent_id" else f"updated_at {order}, agent_id {order}"
    rows, total = await fetch_page(db, "agents", where, order_sql, limit, offset)
    return JSONResponse(views.page(await render_agents(request, rows), total, limit, offset), headers=headers)


@router.post("/api/agents", status_code=201)
async def register_agent(principal: auth.Operator,
                         request: Request, db: deps.Pool, settings: deps.Settings, body: AgentIn) -> JSONResponse:
    """Register an agent; without ``capabilities`` they are probed from the agent (api.md §7.3)."""
    channel = body.channel.lower()
    agent_id = body.agent_id or f"{channel}_{body.name.lower().replace(' ', '_')}"
    if not ID_RE.match(agent_id):
        raise ApiProblem("validation_failed", "the default agent_id is not a valid id; name one",
                         errors={"agent_id": [f"Must match {ID_PATTERN}"]})
    if body.auth is not None and body.auth.type == "bearer" and not body.auth.secret_ref:
        raise ApiProblem("validation_failed", "bearer auth names a secret",
                         errors={"auth.secret_ref": ["This field is required"]})
    await check_url(body.base_url, settings.agent_url_allowlist)
    if body.capabilities is None:
        capabilities, _ = await probe_capabilities(body.base_url, body.protocol, settings.agent_probe_timeout_s)
    else:
        capabilities = _capabilities(body.capabilities, "capabilities", settings)
    resource_key = body.resource_key or agent_id
    async with auditing.refusals_audited(request, "agent", "register", resource_type="agent", resource_id=agent_id,
                                          meta={"base_url": body.base_url, "channel": channel,
                                                "resource_key": resource_key}):
        if await db.fetchval("SELECT 1 FROM agents WHERE agent_id = $1", agent_id):
            raise ApiProblem("agent_exists", f"agent {agent_id} is already registered")
        await _limit_conflict(request, agent_id, resource_key, body.concurrency_limit)
    token = _new_token()
    command = RegisterAgent(
        actor=principal.actor,
        causation_id=request.state.request_id, agent_id=agent_id, name=body.name, channel=channel,
        protocol=body.protocol, base_url=body.base_url, concurrency_limit=body.concurrency_limit,
        resource_key=resource_key, pool_id=body.pool_id or f"{channel}_default", capabilities=capabilities,
        labels=body.labels, auth=(body.auth or AgentAuth()).model_dump(), token_sha256=users.sha256_hex(token))
    outcome = await send(request, "agent", agent_id, command, "register_agent", f"/api/agents/{agent_id}")
    if outcome is None:
        return pending(command.command_id, "register_agent")
    raise_if_rejected(outcome)
    if not await ryw(request, outcome.position):  # registered, but the agents view does not show it yet
        return pending(command.command_id, "register_agent")
    return await _agent_response(request, agent_id, 201, {"agent_token": token}, {
        "Location": f"/api/agents/{agent_id}", **accepted_headers(command.command_id, outcome.position)})


@router.get("/api/agents/probe-capabilities")
async def probe(principal: auth.Operator,
                settings: deps.Settings, base_url: Annotated[str, Query(min_length=1, max_length=2000)],
                protocol: Protocol = "http") -> dict[str, Any]:
    """Fetch an agent's capabilities without storing anything."""
    await check_url(base_url, settings.agent_url_allowlist, field="query.base_url")
    capabilities, info = await probe_capabilities(base_url, protocol, settings.agent_probe_timeout_s)
    return {"capabilities": capabilities, "agent_info": info}


@router.get("/api/agents/pools")
async def list_pools(principal: auth.Viewer,
                     request: Request, db: deps.Pool, channel: str | None = None, limit: Limit = 100,
                     offset: Offset = 0) -> JSONResponse:
    """Pools with their capacity: agents, slots, active leases and open circuits."""
    headers = await min_position(request)
    where = Where()
    where.eq("channel", channel.lower() if channel else None)
    source = """(SELECT pool_id, min(channel) AS channel, count(*) AS agent_count,
                   jsonb_object_agg(status, n) AS status_breakdown
                 FROM (SELECT pool_id, channel, status, count(*) OVER (PARTITION BY pool_id, status) AS n
                       FROM agents) a GROUP BY pool_id) AS pools"""
    rows, total = await fetch_page(db, source, where, "pool_id", limit, offset)
    agents = await db.fetch("SELECT * FROM agents WHERE pool_id = ANY($1::text[])",
                                      [r["pool_id"] for r in rows])
    leases = await read_leases(request) if rows else []
    waiting = await _waiting_steps(db, [r["pool_id"] for r in rows]) if rows else {}
    items = []
    for r in rows:
        members = [a for a in agents if a["pool_id"] == r["pool_id"]]
        ids = {a["agent_id"] for a in members}
        active = [x for x in leases if x.is_active and (x.pool_id == r["pool_id"] or x.agent_id in ids)]
        usable = [a for a in members if a["status"] == "online" and a["circuit_state"] != "open"]
        breakdown = {"online": 0, "offline": 0, "draining": 0} | {
            k: int(v) for k, v in (views._json(r["status_breakdown"]) or {}).items()}
        items.append({
            "pool_id": r["pool_id"], "channel": r["channel"], "agent_count": int(r["agent_count"]),
            "status_breakdown": breakdown,
            "concurrency_limit_total": sum(a["concurrency_limit"] for a in members),
            "active_leases": len(active),
            "available_capacity": max(0, sum(a["concurrency_limit"] for a in usable)
                                      - sum(1 for x in active if x.agent_id in {a["agent_id"] for a in usable})),
            "waiting_steps": waiting.get(r["pool_id"], 0),
            "circuit_open_count": sum(1 for a in members if a["circuit_state"] == "open"),
        })
    return JSONResponse(views.page(items, total, limit, offset), headers=headers)


async def _waiting_steps(db: Any, pool_ids: list[str]) -> dict[str, int]:
    """Step attempts of live runs waiting for a slot of each pool: a ``pool_saturated`` not yet followed by the
    attempt's ``step_started`` (it got a slot) or its end (it gave up: ``lease_wait_timeout``, cancel)."""
    rows = await db.fetch(
        """SELECT e.payload->>'pool_id' AS pool_id, count(*) AS n
             FROM runs r JOIN run_events e ON e.run_id = r.run_id
            WHERE r.status = ANY($2::text[]) AND e.event_type = 'pool_saturated'
              AND e.payload->>'pool_id' = ANY($1::text[])
              AND NOT EXISTS (
                  SELECT 1 FROM run_events s
                   WHERE s.run_id = e.run_id AND s.seq > e.seq
                     AND s.event_type IN ('step_started', 'step_completed', 'step_failed', 'step_timeout')
                     AND s.node_id IS NOT DISTINCT FROM e.node_id AND s.step_id IS NOT DISTINCT FROM e.step_id
                     AND s.attempt IS NOT DISTINCT FROM e.attempt
                     AND s.payload->>'frame' IS NOT DISTINCT FROM e.payload->>'frame')
            GROUP BY 1""", pool_ids, list(runs.EXECUTING_STATUSES))
    return {str(r["pool_id"]): int(r["n"]) for r in rows}


@router.get("/api/agents/bootstrap/{channel}")
async def bootstrap(principal: auth.Viewer, settings: deps.Settings, channel: str) -> dict[str, Any]:
    """What a new agent of ``channel`` needs to register and heartbeat, from settings."""
    if not ID_RE.match(channel):
        raise ApiProblem("validation_failed", "invalid channel", errors={"path.channel": [f"Must match {ID_PATTERN}"]})
    base = (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    channel = channel.lower()
    return {"channel": channel, "default_pool": f"{channel}_default",
            "recommended_concurrency": settings.agent_recommended_concurrency,
            "heartbeat_interval_seconds": settings.agent_heartbeat_interval_s,
            "register_url": f"{base}/api/agents", "heartbeat_url": f"{base}/api/agents/heartbeat"}


@router.post("/api/agents/heartbeat")
async def heartbeat(principal: auth.OperatorOrAgent,
                    request: Request, js: deps.JetStream, settings: deps.Settings, body: HeartbeatIn) -> JSONResponse:
    """Refresh the agent's presence (KV TTL of 3 intervals; the gateway is the heartbeat intake of the shared
    presence bucket); a status change also appends an event."""
    if principal.kind == "agent" and principal.actor.id != body.agent_id:
        raise ApiProblem("forbidden", "an agent token may only heartbeat its own agent", required_role="operator")
    row = await _row(request, body.agent_id)
    value = body.model_dump() | {"last_heartbeat_at": format_time(datetime.now(UTC))}
    await put_with_ttl(js, PRESENCE_BUCKET, agent_presence_key(body.agent_id),
                       json.dumps(value).encode(), 3 * settings.agent_heartbeat_interval_s)
    answer = {"status": "ok", "agent_id": body.agent_id,
              "heartbeat_interval_seconds": settings.agent_heartbeat_interval_s}
    if body.status != row["status"]:
        command = UpdateAgent(actor=principal.actor, causation_id=request.state.request_id, agent_id=body.agent_id,
                              changes={"status": body.status}, reason="heartbeat")
        return await _update(request, command, "update_agent", answer)
    return JSONResponse(answer)


# -- one agent ---------------------------------------------------------------------------------------------------


@router.get("/api/agents/{agent_id}")
async def get_agent(principal: auth.Viewer, request: Request, agent_id: str) -> JSONResponse:
    headers = await min_position(request)
    return await _agent_response(request, agent_id, headers=headers)


async def _patch(principal: auth.Principal, request: Request, agent_id: str, body: AgentPatch) -> JSONResponse:
    fields = {f for f in body.model_fields_set}
    if principal.kind == "agent":
        if principal.actor.id != agent_id:
            raise ApiProblem("forbidden", "an agent token may only change its own agent", required_role="operator")
        if fields - {"status", "capabilities"}:
            raise ApiProblem("forbidden", "an agent token may change only status and capabilities",
                             required_role="operator")
    row = await _row(request, agent_id)
    settings = _settings(request)
    nulls = [f for f in fields if getattr(body, f) is None]
    if nulls:
        raise ApiProblem("validation_failed", "fields cannot be set to null",
                         errors={f: ["Must not be null"] for f in sorted(nulls)})
    changes: dict[str, Any] = {}
    for f in fields:
        value = getattr(body, f)
        if f == "capabilities":
            value = _capabilities(value, "capabilities", settings)
        elif f == "auth":
            value = value.model_dump()
        elif f == "base_url":
            await check_url(value, settings.agent_url_allowlist)
        current = views._json(row[f]) if f in ("capabilities", "labels", "auth") else row[f]
        if value != current:
            changes[f] = value
    if "concurrency_limit" in changes:
        await _limit_conflict(request, agent_id, row["resource_key"], changes["concurrency_limit"])
    if not changes:
        return await _agent_response(request, agent_id)
    command = UpdateAgent(actor=principal.actor, causation_id=request.state.request_id, agent_id=agent_id,
                          changes=changes)
    return await _update(request, command, "update_agent")


@router.patch("/api/agents/{agent_id}")
async def patch_agent(principal: auth.OperatorOrAgent,
                      request: Request, agent_id: str, body: AgentPatch) -> JSONResponse:
    """Partial update; an agent token may change only its own ``status`` and ``capabilities``."""
    return await _patch(principal, request, agent_id, body)


@router.put("/api/agents/{agent_id}", deprecated=True)
async def put_agent(principal: auth.OperatorOrAgent, request: Request, agent_id: str, body: AgentPatch) -> JSONResponse:
    """Accepted alias of PATCH (api.md §1.8)."""
    return await _patch(principal, request, agent_id, body)


@router.delete("/api/agents/{agent_id}", status_code=204)
async def delete_agent(principal: auth.Operator, request: Request, agent_id: str) -> Response:
    """Remove an agent (``agent_removed``): dispatched steps finish, nothing new is sent."""
    await _row(request, agent_id)
    command = RemoveAgent(actor=principal.actor, causation_id=request.state.request_id, agent_id=agent_id)
    outcome = await send(request, "agent", agent_id, command, "remove_agent", f"/api/agents/{agent_id}")
    if outcome is None:
        return pending(command.command_id, "remove_agent")
    raise_if_rejected(outcome)
    await ryw(request, outcome.position)
    return Response(status_code=204, headers=accepted_headers(command.command_id, outcome.position))


@router.post("/api/agents/{agent_id}/sync-capabilities")
async def sync_capabilities(principal: auth.Operator,
                            request: Request, settings: deps.Settings, agent_id: str) -> JSONResponse:
    """Probe the agent again and store what it reports."""
    row = await _row(request, agent_id)
    await check_url(row["base_url"], settings.agent_url_allowlist)
    capabilities, _ = await probe_capabilities(row["base_url"], row["protocol"], settings.agent_probe_timeout_s)
    command = UpdateAgent(actor=principal.actor, causation_id=request.state.request_id, agent_id=agent_id,
                          operation="sync_capabilities", capabilities=capabilities)
    return await _update(request, command, "update_agent")


@router.post("/api/agents/{agent_id}/token")
async def rotate_token(principal: auth.Operator, request: Request, agent_id: str) -> JSONResponse:
    """Issue a new agent token; the previous one stops working (only its SHA-256 was ever stored)."""
    await _row(request, agent_id)
    token = _new_token()
    command = UpdateAgent(actor=principal.actor, causation_id=request.state.request_id, agent_id=agent_id,
                          operation="rotate_token", token_sha256=users.sha256_hex(token))
    return await _update(request, command, "update_agent", {"agent_id": agent_id, "agent_token": token})


# -- leases ------------------------------------------------------------------------------------------------------


@router.get("/api/leases")
async def list_leases(
    principal: auth.Viewer,
    request: Request,
    resource_key: str | None = None,
    agent_id: str | None = None,
    pool_id: str | None = None,
    run_id: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Page of the live leases (ascending ``acquired_at``), asked of the runtime: always current."""
    leases = await read_leases(request, Leases(resource_key=resource_key, agent_id=agent_id, pool_id=pool_id,
                                               run_id=run_id))
    return views.page([x.lease_out() for x in leases[offset:offset + limit]], len(leases), limit, offset)


async def _find_lease(request: Request, lease_id: str) -> LeaseRecord:
    for lease in await read_leases(request, Leases(lease_id=lease_id)):
        return lease
    raise ApiProblem("not_found", f"lease {lease_id} not found", resource="lease")


@router.get("/api/leases/{lease_id}")
async def get_lease(principal: auth.Viewer, request: Request, lease_id: str) -> dict[str, Any]:
    return (await _find_lease(request, lease_id)).lease_out()


@router.delete("/api/leases/{lease_id}", status_code=204)
async def release_lease(principal: auth.Operator, request: Request, settings: deps.Settings, lease_id: str,
                        reason: Annotated[str | None, Query(max_length=2000)] = None) -> Response:
    """Force-release a stuck lease: ``lo.cmd.lease.release`` (runtime), awaited until the key is gone."""
    lease = await _find_lease(request, lease_id)
    command = ReleaseLease(actor=principal.actor,
                           causation_id=request.state.request_id, lease_id=lease_id, key=lease.key,
                           revision=lease.revision, reason=reason)
    outcome = await send(request, "lease", lease_id, command, "release_lease", f"/api/leases/{lease_id}")
    if outcome is None:
        return pending(command.command_id, "release_lease")
    raise_if_rejected(outcome)
    deadline = asyncio.get_running_loop().time() + settings.ryw_timeout_ms / 1000
    drain = deps.clients(request).drain  # a stopping gateway answers before the server cuts the request off
    while asyncio.get_running_loop().time() < deadline and not drain.released:
        if not await read_leases(request, Leases(lease_id=lease_id)):
            break
        await asyncio.sleep(0.02)
    return Response(status_code=204, headers=accepted_headers(command.command_id, outcome.position))
