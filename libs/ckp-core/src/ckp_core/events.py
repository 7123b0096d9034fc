"""The event envelope (DESIGN §3) and the payloads of the events this slice emits (ckp.md §8).

Event type strings are snake_case and match the spec; each payload model is the CamelCase of its type.
Payloads tolerate unknown newer fields (``extra="allow"``) so old readers survive additive changes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.ids import new_id

Aggregate = Literal[
    "run", "procedure", "approval", "agent", "lease", "trigger", "project", "user", "api_key", "secret"
]


def utc_now() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(UTC)


def format_time(ts: datetime) -> str:
    """RFC 3339 in UTC with ``Z`` and microseconds (api.md §1.1)."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Actor(BaseModel):
    """Who caused a command or event."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["user", "api_key", "agent", "trigger", "system", "anonymous"]
    id: str | None = None

    def render(self) -> str:
        """``<kind>:<id>`` as in api.md §1.1, or ``anonymous``."""
        return self.kind if self.id is None else f"{self.kind}:{self.id}"

    @classmethod
    def system(cls, service: str) -> Actor:
        return cls(kind="system", id=service)


ANONYMOUS = Actor(kind="anonymous")


class EventEnvelope(BaseModel):
    """One immutable event on ``LO_EVT``."""

    model_config = ConfigDict(extra="allow")

    event_id: str = Field(default_factory=new_id)
    type: str
    aggregate: Aggregate
    aggregate_id: str
    seq: int = Field(ge=1)
    occurred_at: datetime = Field(default_factory=utc_now)
    actor: Actor
    causation_id: str | None = None
    correlation_id: str | None = None
    schema_version: int = 1
    data: dict[str, Any] = Field(default_factory=dict)


class EventData(BaseModel):
    """Base of typed event payloads."""

    model_config = ConfigDict(extra="allow")

    TYPE: ClassVar[str]
    AGGREGATE: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int] = 1


class ErrorObject(BaseModel):
    """The error object of ckp.md §7.16."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    retryable: bool = False
    node_id: str | None = None
    step_id: str | None = None
    frame: str | None = None
    attempt: int | None = None
    type: str | None = None
    error_code: str | None = None
    http_status: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    cause: dict[str, Any] | None = None


# --- procedure aggregate -------------------------------------------------------------------------


class ProcedureImported(EventData):
    TYPE = "procedure_imported"
    AGGREGATE = "procedure"

    procedure_id: str
    version: str
    name: str | None
    description: str | None
    status: str = "draft"
    release_channel: str = "dev"
    project_id: str | None = None
    tags: list[str] = Field(default_factory=list)
    content_hash: str
    compiler_version: str
    ir_key: str
    ckp_json: dict[str, Any]
    variables_schema: dict[str, Any]
    trigger: dict[str, Any] | None = None
    effective_date: str | None = None
    diagnostics: list[dict[str, Any]] = Field(default_factory=list)


class ProcedureReplaced(EventData):
    """A draft version's document was replaced (and re-compiled)."""

    TYPE = "procedure_replaced"
    AGGREGATE = "procedure"

    procedure_id: str
    version: str
    name: str | None
    description: str | None
    tags: list[str] = Field(default_factory=list)
    content_hash: str
    compiler_version: str
    ir_key: str
    ckp_json: dict[str, Any]
    variables_schema: dict[str, Any]
    trigger: dict[str, Any] | None = None
    effective_date: str | None = None
    diagnostics: list[dict[str, Any]] = Field(default_factory=list)


class ProcedureVersionDeleted(EventData):
    """A version was removed; its IR key in ``lo_procedures`` is deleted after this event."""

    TYPE = "procedure_version_deleted"
    AGGREGATE = "procedure"

    procedure_id: str
    version: str
    ir_key: str


class ProcedureStatusChanged(EventData):
    """A version moved through the lifecycle (api.md §4.4); an activation carries the version it displaced."""

    TYPE = "procedure_status_changed"
    AGGREGATE = "procedure"

    procedure_id: str
    version: str
    from_status: str
    status: str
    release_channel: str
    reason: str | None = None
    displaced_version: str | None = None
    compiler_version: str | None = None
    diagnostics: list[dict[str, Any]] | None = None


class ProcedurePromoted(EventData):
    """A version became ``active`` in ``target_channel``, deprecating the one active there (api.md §4.5)."""

    TYPE = "procedure_promoted"
    AGGREGATE = "procedure"

    procedure_id: str
    version: str
    deployment_id: str
    from_channel: str
    from_status: str
    target_channel: str
    displaced_version: str | None = None
    reason: str | None = None
    compiler_version: str | None = None
    diagnostics: list[dict[str, Any]] = Field(default_factory=list)


class ProcedureRolledBack(EventData):
    """``version`` (active in ``target_channel``) was deprecated and ``restored_version`` re-activated."""

    TYPE = "procedure_rolled_back"
    AGGREGATE = "procedure"

    procedure_id: str
    version: str
    deployment_id: str
    target_channel: str
    restored_version: str
    reason: str | None = None


class CommandRejected(EventData):
    TYPE = "command_rejected"
    AGGREGATE = "procedure"

    command_id: str
    command_type: str
    code: str
    detail: str
    extra: dict[str, Any] = Field(default_factory=dict)


# --- run aggregate ---------------------------------------------------------------------------------


class RunCreated(EventData):
    TYPE = "run_created"
    AGGREGATE = "run"

    procedure_id: str
    procedure_version: str
    release_channel: str | None = None
    input_vars: dict[str, Any] = Field(default_factory=dict)
    trigger_type: str = "api"
    triggered_by: str | None = None
    parent_run_id: str | None = None
    parent_node_id: str | None = None
    root_run_id: str
    rerun_of: str | None = None
    execution_mode: str = "production"
    project_id: str | None = None


class ExecutionStarted(EventData):
    TYPE = "execution_started"
    AGGREGATE = "run"

    entry_node_id: str
    execution_mode: str
    runtime_instance: str | None = None  # the runtime replica executing the run (diagnostics, api.md §5.8)


class ExecutionRecovered(EventData):
    TYPE = "execution_recovered"
    AGGREGATE = "run"

    delivery_count: int
    checkpoint_id: str | None
    runtime_instance: str | None = None  # the replica that took the run over


class RunCompleted(EventData):
    TYPE = "run_completed"
    AGGREGATE = "run"

    outputs: dict[str, Any] = Field(default_factory=dict)
    recovered_via: str | None = None


class RunFailed(EventData):
    TYPE = "run_failed"
    AGGREGATE = "run"

    error: ErrorObject
    outputs: dict[str, Any] = Field(default_factory=dict)
    recovered_via: str | None = None
    recovery_error: ErrorObject | None = None


class NodeStarted(EventData):
    TYPE = "node_started"
    AGGREGATE = "run"

    node_id: str
    frame: str = "-"
    node_type: str
    node_name: str | None
    visit: int


class NodeCompleted(EventData):
    TYPE = "node_completed"
    AGGREGATE = "run"

    node_id: str
    frame: str = "-"
    node_type: str
    next_node: str | None
    duration_ms: int


class NodeError(EventData):
    TYPE = "node_error"
    AGGREGATE = "run"

    node_id: str
    frame: str = "-"
    error: ErrorObject
    routed_to: str | None = None


class StepStarted(EventData):
    TYPE = "step_started"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    attempt: int
    action: str
    binding_kind: str
    channel: str | None = None
    agent_id: str | None = None
    idempotency_key: str
    params: dict[str, Any] = Field(default_factory=dict)


class StepCompleted(EventData):
    TYPE = "step_completed"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    attempt: int
    action: str
    output_variable: str | None = None
    duration_ms: int
    retry_count: int = 0
    suppressed_error: ErrorObject | None = None


class StepReplayed(EventData):
    TYPE = "step_replayed"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    action: str
    output_variable: str | None = None
    original_attempt: int


class StepFailed(EventData):
    TYPE = "step_failed"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    attempt: int
    action: str
    error: ErrorObject


class Log(EventData):
    TYPE = "log"
    AGGREGATE = "run"

    node_id: str | None = None
    step_id: str | None = None
    level: str
    message: str


class TemplateWarning(EventData):
    TYPE = "template_warning"
    AGGREGATE = "run"

    variable: str
    reason: str
    location: dict[str, Any]


# --- project aggregate (gateway-owned) ------------------------------------------------------------------


class ProjectCreated(EventData):
    TYPE = "project_created"
    AGGREGATE = "project"

    project_id: str
    name: str
    description: str | None = None


class ProjectUpdated(EventData):
    """The project's state after the change (every field, so the projection needs no history)."""

    TYPE = "project_updated"
    AGGREGATE = "project"

    project_id: str
    name: str
    description: str | None = None


class ProjectDeleted(EventData):
    TYPE = "project_deleted"
    AGGREGATE = "project"

    project_id: str


# --- agent aggregate (runtime-owned) and leases -----------------------------------------------------------


class AgentRegistered(EventData):
    """A new agent; only the SHA-256 of its token is ever recorded."""

    TYPE = "agent_registered"
    AGGREGATE = "agent"

    agent_id: str
    name: str
    channel: str
    protocol: str = "http"
    base_url: str
    status: str = "online"
    concurrency_limit: int = 1
    resource_key: str
    pool_id: str
    capabilities: list[dict[str, Any]] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    auth: dict[str, Any] = Field(default_factory=lambda: {"type": "none", "secret_ref": None})
    token_sha256: str


class AgentUpdated(EventData):
    """Changed fields of an agent with their new values (``status`` changes use ``agent_status_changed``)."""

    TYPE = "agent_updated"
    AGGREGATE = "agent"

    agent_id: str
    changes: dict[str, Any]


class AgentCapabilitiesSynced(EventData):
    TYPE = "agent_capabilities_synced"
    AGGREGATE = "agent"

    agent_id: str
    capabilities: list[dict[str, Any]]


class AgentTokenRotated(EventData):
    TYPE = "agent_token_rotated"
    AGGREGATE = "agent"

    agent_id: str
    token_sha256: str


class AgentStatusChanged(EventData):
    TYPE = "agent_status_changed"
    AGGREGATE = "agent"

    agent_id: str
    from_status: str
    status: str
    reason: str | None = None


class AgentCircuitOpened(EventData):
    TYPE = "agent_circuit_opened"
    AGGREGATE = "agent"

    agent_id: str
    consecutive_failures: int
    last_error: str | None = None


class AgentCircuitClosed(EventData):
    TYPE = "agent_circuit_closed"
    AGGREGATE = "agent"

    agent_id: str


class AgentRemoved(EventData):
    TYPE = "agent_removed"
    AGGREGATE = "agent"

    agent_id: str


class LeaseForceReleased(EventData):
    """An operator deleted a lease key; the holding runtime aborts its step with ``lease_revoked``."""

    TYPE = "lease_force_released"
    AGGREGATE = "lease"

    lease_id: str
    resource_key: str
    slot: int | None = None
    run_id: str | None = None
    reason: str | None = None


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.TYPE: cls
    for cls in (
        ProcedureImported, ProcedureReplaced, ProcedureVersionDeleted, ProcedureStatusChanged, ProcedurePromoted,
        ProcedureRolledBack, CommandRejected, RunCreated, ExecutionStarted, ExecutionRecovered, RunCompleted,
        RunFailed, NodeStarted, NodeCompleted, NodeError, StepStarted, StepCompleted, StepReplayed,
        StepFailed, Log, TemplateWarning, ProjectCreated, ProjectUpdated, ProjectDeleted, AgentRegistered,
        AgentUpdated, AgentCapabilitiesSynced, AgentTokenRotated, AgentStatusChanged, AgentCircuitOpened,
        AgentCircuitClosed, AgentRemoved, LeaseForceReleased,
    )
}


def make_event(
    data: EventData,
    *,
    aggregate_id: str,
    seq: int,
    actor: Actor,
    causation_id: str | None = None,
    correlation_id: str | None = None,
    event_id: str | None = None,
    aggregate: str | None = None,
) -> EventEnvelope:
    """Wrap a typed payload in an envelope."""
    return EventEnvelope(
        event_id=event_id or new_id(),
        type=data.TYPE,
        aggregate=aggregate or data.AGGREGATE,
        aggregate_id=aggregate_id,
        seq=seq,
        actor=actor,
        causation_id=causation_id,
        correlation_id=correlation_id,
        schema_version=data.SCHEMA_VERSION,
        data=data.model_dump(mode="json"),
    )


def event_json_schemas() -> dict[str, Any]:
    """JSON Schemas of the envelope and every payload type (served at ``/api/schemas/events``)."""
    return {
        "envelope": EventEnvelope.model_json_schema(),
        "types": {
            name: {"schema_version": cls.SCHEMA_VERSION, "schema": cls.model_json_schema()}
            for name, cls in EVENT_TYPES.items()
        },
    }


# The remaining run payloads of ckp.md §8 live in their own module; importing it registers them above.
import ckp_core.run_events  # noqa: E402, F401
