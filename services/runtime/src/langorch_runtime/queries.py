"""Read queries the runtime answers for the gateway over the NATS services API (``ckp_core.queries``).

The runtime owns the LangGraph checkpoints (PostgreSQL, read through the official saver), the step records (KV
``lo_steps``), the leases (KV ``lo_leases``) and the agents' live state (heartbeats and probes in KV
``lo_presence``). The gateway never reads that storage: it sends a request on ``lo.qry.…`` and one replica answers
(every replica serves the endpoints in one queue group). A bad request is answered with service error code 400,
a reply above ``MAX_REPLY_BYTES`` with 413, a failure of this replica with 500 — never left to time out. A reply
larger than one NATS message is sent in parts, in order (header ``CHUNK_HEADER``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointTuple
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError

from ckp_core.events import format_time
from ckp_core.queries import (
    CHUNK_HEADER,
    MAX_REPLY_BYTES,
    AgentHeartbeat,
    AgentLive,
    AgentProbe,
    AgentsLive,
    AgentsLiveReply,
    CheckpointDetail,
    CheckpointSummary,
    LeaseRecord,
    Leases,
    LeasesReply,
    PendingWrite,
    Query,
    QueryError,
    Reply,
    RunCheckpoint,
    RunCheckpointReply,
    RunCheckpoints,
    RunCheckpointsReply,
    RunDiagnostics,
    RunDiagnosticsReply,
    StepEntry,
)
from ckp_core.redaction import Redactor
from ckp_core.subjects import (
    LEASES_BUCKET,
    PRESENCE_BUCKET,
    RUNTIME_QUERY_GROUP,
    RUNTIME_QUERY_SERVICE,
    STEPS_BUCKET,
    agent_presence_key,
    agent_probe_key,
)
from langorch_infra.hosting import bus_checks
from langorch_infra.jetstream import connect, ensure_topology
from langorch_infra.kv import kv_live
from langorch_infra.metrics import package_version
from langorch_infra.settings import RuntimeSettings

log = logging.getLogger(__name__)

VERSION = package_version("langorch-runtime")
RUN_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # a KV key token: anything else names no run of this runtime
CHUNK_ROOM = 1024  # of a NATS message, left for the headers of a reply's chunk
_REDACT = Redactor()

Answer = Callable[[Any], Awaitable[Reply]]


# -- checkpoints (pure shaping of the saver's tuples) -----------------------------------------------------------


def _plain(value: Any) -> Any:
    """A checkpoint value as JSON (LangGraph may hold non-JSON objects: rendered as strings)."""
    return json.loads(json.dumps(value, default=str))


def _checkpoint_ts(checkpoint: dict[str, Any]) -> str | None:
    ts = checkpoint.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return format_time(datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC))
    except ValueError:
        return ts


def _changed(current: dict[str, Any], parent: dict[str, Any] | None) -> list[str]:
    parent = parent or {}
    return sorted(k for k, v in current.items() if not k.startswith("__") and parent.get(k) != v)


def _parent_id(tup: CheckpointTuple) -> str | None:
    value = (tup.parent_config or {}).get("configurable", {}).get("checkpoint_id")
    return str(value) if value is not None else None


def checkpoint_summary(tup: CheckpointTuple, parent: CheckpointTuple | None) -> CheckpointSummary:
    """``writes`` are the channels whose version moved since the parent checkpoint, ``node_ids`` the nodes whose
    seen versions moved (the nodes of the step that wrote it)."""
    cp, meta = tup.checkpoint, tup.metadata or {}
    conf = tup.config["configurable"]
    pcp = parent.checkpoint if parent is not None else None
    step = meta.get("step")
    return CheckpointSummary(
        checkpoint_id=cp["id"], thread_id=conf.get("thread_id"), checkpoint_ns=conf.get("checkpoint_ns", ""),
        parent_checkpoint_id=_parent_id(tup), step=step if isinstance(step, int) else None,
        source=meta.get("source"),
        node_ids=_changed(dict(cp.get("versions_seen") or {}),
                          dict(pcp.get("versions_seen") or {}) if pcp is not None else None),
        writes=_changed(dict(cp.get("channel_versions") or {}),
                        dict(pcp.get("channel_versions") or {}) if pcp is not None else None),
        created_at=_checkpoint_ts(dict(cp)))


def _bounded(values: dict[str, Any], prefix: str, max_bytes: int, truncated: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > max_bytes:
            out[key] = {"_truncated": True, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
            truncated.append(f"{prefix}.{key}")
        else:
            out[key] = value
    return out


def checkpoint_detail(tup: CheckpointTuple, run_id: str, checkpoint_ns: str, max_value_bytes: int) -> CheckpointDetail:
    """One checkpoint's state, redacted (api.md §1.7), values above ``max_value_bytes`` truncated."""
    cp = tup.checkpoint
    truncated: list[str] = []
    values = _REDACT.redact(_plain(dict(cp.get("channel_values") or {})))
    writes = []
    for i, (task_id, channel, value) in enumerate(tup.pending_writes or []):
        bounded = _bounded({"value": _REDACT.redact(_plain(value))}, f"pending_writes.{i}", max_value_bytes,
                           truncated)
        writes.append(PendingWrite(task_id=task_id, channel=channel, value=bounded["value"]))
    metadata = _REDACT.redact(_plain(dict(tup.metadata or {})))
    return CheckpointDetail(
        checkpoint_id=cp["id"], thread_id=run_id, checkpoint_ns=checkpoint_ns, parent_checkpoint_id=_parent_id(tup),
        created_at=_checkpoint_ts(dict(cp)), step=metadata.get("step"), source=metadata.get("source"),
        channel_values=_bounded(values, "channel_values", max_value_bytes, truncated),
        channel_versions=_plain(dict(cp.get("channel_versions") or {})),
        versions_seen=_plain(dict(cp.get("versions_seen") or {})),
        pending_writes=writes, metadata=metadata, truncated_paths=truncated)


# -- KV records (pure parsing) ----------------------------------------------------------------------------------


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def lease_record(key: str, revision: int, raw: bytes, now: datetime) -> LeaseRecord | None:
    """A lease key's value as a record (``is_active``: not past ``expires_at``); None for anything else."""
    value = _json_object(raw)
    if value is None or not value.get("lease_id"):
        return None
    expires = _parse_time(value.get("expires_at"))
    try:
        return LeaseRecord.model_validate(value | {"key": key, "revision": revision,
                                                   "is_active": expires is None or expires > now})
    except ValidationError:
        return None


def step_entry(raw: bytes) -> StepEntry | None:
    """A step record of KV ``lo_steps`` as an ``idempotency_entries`` item (its loop iteration from the frame)."""
    value = _json_object(raw)
    if value is None:
        return None
    loops = re.findall(r"\[(\d+)\]", str(value.get("frame") or ""))
    try:
        return StepEntry(idempotency_key=value.get("idempotency_key"), node_id=value.get("node_id"),
                         step_id=value.get("step_id"), iteration=int(loops[-1]) if loops else None,
                         attempt=value.get("attempt"), status=value.get("status"),
                         has_cached_result=value.get("status") == "completed" and value.get("result") is not None,
                         updated_at=value.get("updated_at"))
    except ValidationError:
        return None


# -- the component ------------------------------------------------------------------------------------------------


class RuntimeQueries:
    """The runtime's query endpoints: one component of a runtime replica (``host()``), with its own NATS
    connection and, opened on the first checkpoint query, a small pool for the checkpoint saver."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.service: Service | None = None
        self._pool: AsyncConnectionPool[Any] | None = None
        self._saver: AsyncPostgresSaver | None = None
        self._saver_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def js(self) -> JetStreamContext | None:
        return self._js

    @property
    def answers(self) -> dict[type[Query], Answer]:
        return {RunCheckpoints: self.run_checkpoints, RunCheckpoint: self.run_checkpoint,
                RunDiagnostics: self.run_diagnostics, Leases: self.leases, AgentsLive: self.agents_live}

    async def start(self) -> None:
        self.nc = await connect(self.settings.nats_url, f"langorch-runtime-queries-{self.instance}",
                                self.settings)
        self._js = self.nc.jetstream()
        await ensure_topology(self._js, audit_retention_days=self.settings.audit_retention_days,
                              replicas=self.settings.nats_replicas)
        self.presence: KeyValue = await self._js.key_value(PRESENCE_BUCKET)
        self.service = await add_service(self.nc, name=RUNTIME_QUERY_SERVICE, version=VERSION,
                                         queue_group=RUNTIME_QUERY_GROUP,
                                         description="Read queries of the runtime's checkpoints, steps, leases "
                                                     "and agent liveness")
        for query_type, answer in self.answers.items():
            await self.service.add_endpoint(name=query_type.SUBJECT.removeprefix("lo.qry.").replace(".", "-"),
                                            subject=query_type.SUBJECT, handler=self._endpoint(query_type, answer))
        await self.nc.flush()

    async def run(self) -> None:
        """Requests are answered by the subscriptions' callbacks; this only waits to be cancelled."""
        await asyncio.Event().wait()

    async def stop(self) -> None:
        if self.service is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await self.service.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await task
        if self._pool is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await self._pool.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await self.nc.close()

    def leader_of(self) -> list[str]:
        return []

    async def ready_checks(self) -> dict[str, str]:
        """NATS connected and the buckets the queries read present."""
        return await bus_checks(self.nc, self._js, (), (STEPS_BUCKET, LEASES_BUCKET, PRESENCE_BUCKET))

    # -- the wire ---------------------------------------------------------------------------------------------------

    def _endpoint(self, query_type: type[Query], answer: Answer) -> Callable[[Request], Awaitable[None]]:
        async def handle(request: Request) -> None:
            # answered in a task of its own: a slow checkpoint read does not hold up the next request
            task = asyncio.create_task(self._answer(query_type, answer, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return handle

    async def _answer(self, query_type: type[Query], answer: Answer, request: Request) -> None:
        try:
            query = query_type.model_validate_json(request.data)
        except ValidationError as exc:
            await _refuse(request, "400", "bad_query", f"not a {query_type.__name__}: {exc.error_count()} errors")
            return
        try:
            reply = await answer(query)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # answered, not left to time out: the gateway says which owner failed
            log.exception("query %s failed", query_type.SUBJECT)
            await _refuse(request, "500", "query_failed", f"{type(exc).__name__} answering {query_type.SUBJECT}")
            return
        body = reply.model_dump_json().encode()
        if len(body) > MAX_REPLY_BYTES:
            await _refuse(request, "413", "reply_too_large",
                          f"the reply of {len(body)} bytes exceeds the {MAX_REPLY_BYTES} bytes a query may answer")
            return
        limit = max(1, (self.nc.max_payload if self.nc is not None else len(body)) - CHUNK_ROOM)
        if len(body) <= limit:
            await request.respond(body)
            return
        parts = [body[i:i + limit] for i in range(0, len(body), limit)]
        for n, part in enumerate(parts, 1):  # one publisher to one inbox: NATS delivers them in order
            await request.respond(part, headers={CHUNK_HEADER: f"{n}/{len(parts)}"})

    # -- checkpoints ------------------------------------------------------------------------------------------

    async def _checkpoint_saver(self) -> AsyncPostgresSaver:
        async with self._saver_lock:
            if self._saver is None:
                pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                    self.settings.database_url, min_size=1, max_size=4, open=False,
                    kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row})
                await pool.open()
                self._pool, self._saver = pool, AsyncPostgresSaver(pool)
            return self._saver

    async def _thread(self, run_id: str, checkpoint_ns: str) -> list[CheckpointTuple]:
        """Every checkpoint of the run's thread in ``checkpoint_ns``, newest first (none before the runtime created
        the saver's tables)."""
        saver = await self._checkpoint_saver()
        config: RunnableConfig = {"configurable": {"thread_id": run_id, "checkpoint_ns": checkpoint_ns}}
        try:
            return [t async for t in saver.alist(config)
                    if t.config["configurable"].get("checkpoint_ns", "") == checkpoint_ns]
        except psycopg.errors.UndefinedTable:
            return []

    async def run_checkpoints(self, query: RunCheckpoints) -> RunCheckpointsReply:
        tuples = await self._thread(query.run_id, query.checkpoint_ns)
        by_id = {t.checkpoint["id"]: t for t in tuples}
        items = []
        for t in tuples[query.offset:query.offset + query.limit]:
            parent_id = _parent_id(t)
            items.append(checkpoint_summary(t, by_id.get(parent_id) if parent_id else None))
        return RunCheckpointsReply(total=len(tuples), items=items)

    async def run_checkpoint(self, query: RunCheckpoint) -> RunCheckpointReply:
        saver = await self._checkpoint_saver()
        config: RunnableConfig = {"configurable": {"thread_id": query.run_id, "checkpoint_ns": query.checkpoint_ns,
                                                   "checkpoint_id": query.checkpoint_id}}
        try:
            tup = await saver.aget_tuple(config)
        except psycopg.errors.UndefinedTable:
            tup = None
        if tup is None or tup.checkpoint["id"] != query.checkpoint_id:
            return RunCheckpointReply(checkpoint=None)
        return RunCheckpointReply(checkpoint=checkpoint_detail(tup, query.run_id, query.checkpoint_ns,
                                                               query.max_value_bytes))

    # -- KV reads ---------------------------------------------------------------------------------------------

    async def _leases(self) -> list[LeaseRecord]:
        assert self._js is not None
        now = datetime.now(UTC)
        found = [lease_record(key, revision, raw, now) for key, revision, raw in await kv_live(self._js, LEASES_BUCKET)]
        leases = [lease for lease in found if lease is not None]
        leases.sort(key=lambda x: (x.acquired_at or "", x.lease_id))
        return leases

    async def leases(self, query: Leases) -> LeasesReply:
        wanted = {k: v for k, v in query.model_dump().items() if v is not None and v != ""}
        return LeasesReply(leases=[lease for lease in await self._leases()
                                   if all(getattr(lease, k) == v for k, v in wanted.items())])

    async def run_diagnostics(self, query: RunDiagnostics) -> RunDiagnosticsReply:
        assert self._js is not None
        if not RUN_ID.match(query.run_id):
            return RunDiagnosticsReply(idempotency_entries=[], active_leases=[], checkpoint_count=0,
                                       last_checkpoint_id=None)
        found = [step_entry(raw) for _, _, raw in await kv_live(self._js, STEPS_BUCKET, f"{query.run_id}.>")]
        entries = sorted((e for e in found if e is not None), key=lambda e: e.updated_at or "")
        leases = [lease for lease in await self._leases() if lease.run_id == query.run_id and lease.is_active]
        saved = await self._thread(query.run_id, "")  # every checkpoint of the root namespace, newest first (not
        # only the forced saves that emit checkpoint_saved), as lo.qry.run.checkpoints counts them
        return RunDiagnosticsReply(idempotency_entries=entries, active_leases=leases, checkpoint_count=len(saved),
                                   last_checkpoint_id=saved[0].checkpoint["id"] if saved else None)

    async def _presence(self, key: str) -> dict[str, Any] | None:
        try:
            entry = await self.presence.get(key)
        except (KeyNotFoundError, KeyDeletedError, NotFoundError):
            return None
        return _json_object(entry.value) if entry.value else None

    async def agents_live(self, query: AgentsLive) -> AgentsLiveReply:
        leases = [lease for lease in await self._leases() if lease.is_active] if query.agent_ids else []

        async def one(agent_id: str) -> AgentLive:
            heartbeat, probe = await asyncio.gather(self._presence(agent_presence_key(agent_id)),
                                                    self._presence(agent_probe_key(agent_id)))
            return AgentLive(
                agent_id=agent_id,
                heartbeat=AgentHeartbeat.model_validate(heartbeat) if heartbeat is not None else None,
                probe=AgentProbe.model_validate(probe) if probe is not None else None,
                active_leases=sum(1 for lease in leases if lease.agent_id == agent_id))

        return AgentsLiveReply(agents=list(await asyncio.gather(*(one(a) for a in query.agent_ids))))


async def _refuse(request: Request, status: str, code: str, detail: str) -> None:
    await request.respond_error(status, detail, data=QueryError(code=code, detail=detail).model_dump_json().encode())
