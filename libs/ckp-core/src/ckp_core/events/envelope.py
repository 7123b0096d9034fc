"""The event envelope (DESIGN §3), the base of every typed payload, and :func:`make_event` that wraps one.

Event type strings are snake_case and match the spec (ckp.md §8); each payload model is the CamelCase of its type
and names its ``TYPE``, the ``AGGREGATE`` it is written on and its ``SCHEMA_VERSION``. Payloads tolerate unknown
newer fields (``extra="allow"``) so old readers survive additive changes.
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
