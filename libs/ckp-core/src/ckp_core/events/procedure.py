"""Events of the procedure aggregate (owned by the compiler service): import, replacement, lifecycle, deployment."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ckp_core.events.envelope import EventData


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


EVENTS: tuple[type[EventData], ...] = (
    ProcedureImported, ProcedureReplaced, ProcedureVersionDeleted, ProcedureStatusChanged, ProcedurePromoted,
    ProcedureRolledBack, CommandRejected,
)
