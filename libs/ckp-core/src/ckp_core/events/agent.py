"""Events of the agent aggregate (owned by the runtime): registration, changes, status and circuit breaker."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ckp_core.events.envelope import EventData


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

EVENTS: tuple[type[EventData], ...] = (
    AgentRegistered, AgentUpdated, AgentCapabilitiesSynced, AgentTokenRotated, AgentStatusChanged,
    AgentCircuitOpened, AgentCircuitClosed, AgentRemoved,
)
