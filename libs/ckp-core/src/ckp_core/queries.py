"""Request/reply queries the runtime answers over the NATS services API (one pydantic model per message).

The runtime owns the LangGraph checkpoints, the step records (KV ``lo_steps``), the leases (KV ``lo_leases``) and
the agents' live state (heartbeats and probes); the gateway asks it instead of reading that storage. Each query
class names its subject (``ckp_core.subjects``) and its reply class. Unknown fields are ignored on both sides, so
a field can be added without breaking the other.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.subjects import (
    QUERY_AGENTS_LIVE,
    QUERY_LEASES,
    QUERY_RUN_CHECKPOINT,
    QUERY_RUN_CHECKPOINTS,
    QUERY_RUN_DIAGNOSTICS,
)

MAX_VALUE_BYTES = 1_048_576
# A reply larger than one NATS message comes as several, in order, each with the header ``LangOrch-Chunk: i/n``;
# the parts joined are the reply. A reply above MAX_REPLY_BYTES is refused (413).
CHUNK_HEADER = "LangOrch-Chunk"
MAX_REPLY_BYTES = 64 * 1_048_576


class Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Query(BaseModel):
    model_config = ConfigDict(extra="ignore")

    SUBJECT: ClassVar[str]
    REPLY: ClassVar[type[Reply]]


class QueryError(BaseModel):
    """Body of a refused query (``Nats-Service-Error-Code`` header: 400 bad request, 413 reply above
    ``MAX_REPLY_BYTES``, 500 the owner failed)."""

    code: str
    detail: str


# -- checkpoints -------------------------------------------------------------------------------------------------


class CheckpointSummary(BaseModel):
    """``CheckpointSummary`` (api.md §5.8)."""

    checkpoint_id: str
    thread_id: str | None
    checkpoint_ns: str
    parent_checkpoint_id: str | None
    step: int | None
    source: str | None
    node_ids: list[str]
    writes: list[str]
    created_at: str | None


class RunCheckpointsReply(Reply):
    total: int
    items: list[CheckpointSummary]


class RunCheckpoints(Query):
    """``lo.qry.run.checkpoints``: a page of a run's checkpoints in one namespace, newest first."""

    SUBJECT = QUERY_RUN_CHECKPOINTS
    REPLY = RunCheckpointsReply

    run_id: str
    checkpoint_ns: str = ""
    offset: int = Field(0, ge=0)
    limit: int = Field(100, ge=0)


class PendingWrite(BaseModel):
    task_id: str
    channel: str
    value: Any = None


class CheckpointDetail(BaseModel):
    """``CheckpointDetail`` (api.md §5.8): values redacted, those above ``max_value_bytes`` truncated."""

    checkpoint_id: str
    thread_id: str
    checkpoint_ns: str
    parent_checkpoint_id: str | None
    created_at: str | None
    step: Any = None
    source: Any = None
    channel_values: dict[str, Any]
    channel_versions: dict[str, Any]
    versions_seen: dict[str, Any]
    pending_writes: list[PendingWrite]
    metadata: dict[str, Any]
    truncated_paths: list[str]


class RunCheckpointReply(Reply):
    checkpoint: CheckpointDetail | None  # None: no such checkpoint in that namespace of the run's thread


class RunCheckpoint(Query):
    """``lo.qry.run.checkpoint``: one checkpoint's state."""

    SUBJECT = QUERY_RUN_CHECKPOINT
    REPLY = RunCheckpointReply

    run_id: str
    checkpoint_id: str
    checkpoint_ns: str = ""
    max_value_bytes: int = Field(65_536, ge=1, le=MAX_VALUE_BYTES)


# -- leases ------------------------------------------------------------------------------------------------------


class LeaseRecord(BaseModel):
    """One live lease: ``LeaseOut`` (api.md §8) plus its KV ``key`` and ``revision`` (a force-release names them)."""

    lease_id: str
    resource_key: str | None = None
    slot: int | None = None
    agent_id: str | None = None
    pool_id: str | None = None
    run_id: str | None = None
    node_id: str | None = None
    step_id: str | None = None
    holder: str | None = None
    acquired_at: str | None = None
    renewed_at: str | None = None
    expires_at: str | None = None
    is_active: bool
    key: str
    revision: int

    def lease_out(self) -> dict[str, Any]:
        """The ``LeaseOut`` of the API."""
        return self.model_dump(exclude={"key", "revision"})


class LeasesReply(Reply):
    leases: list[LeaseRecord]  # ascending acquired_at, then lease_id


class Leases(Query):
    """``lo.qry.lease.list``: the live leases matching every given field."""

    SUBJECT = QUERY_LEASES
    REPLY = LeasesReply

    lease_id: str | None = None
    resource_key: str | None = None
    agent_id: str | None = None
    pool_id: str | None = None
    run_id: str | None = None


# -- run diagnostics -----------------------------------------------------------------------------------------------


class StepEntry(BaseModel):
    """One ``idempotency_entries`` item of ``RunDiagnostics`` (api.md §5.8), from the run's step records."""

    idempotency_key: str | None
    node_id: str | None
    step_id: str | None
    iteration: int | None
    attempt: int | None
    status: str | None
    has_cached_result: bool
    updated_at: str | None


class RunDiagnosticsReply(Reply):
    idempotency_entries: list[StepEntry]  # oldest update first
    active_leases: list[LeaseRecord]
    checkpoint_count: int  # every checkpoint of the root namespace
    last_checkpoint_id: str | None


class RunDiagnostics(Query):
    """``lo.qry.run.diagnostics``: the runtime's live part of a run's diagnostics."""

    SUBJECT = QUERY_RUN_DIAGNOSTICS
    REPLY = RunDiagnosticsReply

    run_id: str


# -- agents ------------------------------------------------------------------------------------------------------


class AgentHeartbeat(BaseModel):
    """The agent's last heartbeat while it is fresh (api.md §7.3)."""

    status: str | None = None
    cpu_percent: float | None = None
    memory_percent: float | None = None
    active_tasks: int | None = None
    agent_version: str | None = None
    last_heartbeat_at: str | None = None


class AgentProbe(BaseModel):
    """The elected replica's last health probe of the agent."""

    ok: bool | None = None
    error: str | None = None
    consecutive_failures: int = 0
    last_probe_at: str | None = None
    last_success_at: str | None = None


class AgentLive(BaseModel):
    agent_id: str
    heartbeat: AgentHeartbeat | None
    probe: AgentProbe | None
    active_leases: int


class AgentsLiveReply(Reply):
    agents: list[AgentLive]  # one per asked agent, in the order asked


class AgentsLive(Query):
    """``lo.qry.agent.live``: heartbeat, last probe and active leases of each agent."""

    SUBJECT = QUERY_AGENTS_LIVE
    REPLY = AgentsLiveReply

    agent_ids: list[str]
