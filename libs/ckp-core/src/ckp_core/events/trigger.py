"""Events of the trigger aggregate (owned by the triggers service, api.md §10).

A trigger aggregate is one registration: id ``<procedure_id>@<version>`` (:func:`ckp_core.triggers.trigger_id`).
``trigger_registered`` and ``trigger_updated`` carry the whole registration, so a reader needs no history;
``trigger_fired`` and ``trigger_fire_skipped`` record each fire (the ``fires`` history).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ckp_core.events.envelope import EventData

TriggerType = Literal["scheduled", "webhook", "event", "file_watch"]
FireOutcome = Literal["duplicate", "throttled", "skipped", "invalid"]


class TriggerRegistered(EventData):
    """A registration was created (its whole configuration)."""

    TYPE = "trigger_registered"
    AGGREGATE = "trigger"

    procedure_id: str
    version: str
    trigger_type: TriggerType
    schedule: str | None = None
    timezone: str = "UTC"
    webhook_secret: str | None = Field(None, description="Name of the secret holding the HMAC key, never the key.")
    signature_scheme: Literal["timestamped", "body"] = "timestamped"
    event_source: str | None = None
    input_vars: dict[str, Any] = Field(default_factory=dict)
    dedupe_window_seconds: int = 0
    max_concurrent_runs: int | None = None
    enabled: bool = True
    source: Literal["api", "ckp"] = "api"


class TriggerUpdated(TriggerRegistered):
    """A registration was replaced (its whole configuration after the change)."""

    TYPE = "trigger_updated"
    AGGREGATE = "trigger"


class TriggerDeleted(EventData):
    TYPE = "trigger_deleted"
    AGGREGATE = "trigger"

    procedure_id: str
    version: str


class TriggerEnabled(EventData):
    TYPE = "trigger_enabled"
    AGGREGATE = "trigger"

    procedure_id: str
    version: str


class TriggerDisabled(EventData):
    TYPE = "trigger_disabled"
    AGGREGATE = "trigger"

    procedure_id: str
    version: str


class TriggerFired(EventData):
    """A fire created a run (its ``run_created`` is already appended)."""

    TYPE = "trigger_fired"
    AGGREGATE = "trigger"

    procedure_id: str
    version: str
    fire_id: str
    run_id: str
    trigger_type: str = Field(description="How the run was started: manual, scheduled, webhook, event, file_watch.")
    triggered_by: str | None = None
    source_detail: dict[str, Any] = Field(default_factory=dict)


class TriggerFireSkipped(EventData):
    """A fire that started no run: a duplicate delivery, the concurrency limit, a skip or refused inputs."""

    TYPE = "trigger_fire_skipped"
    AGGREGATE = "trigger"

    procedure_id: str
    version: str
    fire_id: str
    outcome: FireOutcome
    reason: str
    detail: str | None = None
    trigger_type: str
    triggered_by: str | None = None
    run_id: str | None = Field(None, description="The run a duplicate delivery refers to.")
    source_detail: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict, description="Problem members (errors, existing_run_id …).")


EVENTS: tuple[type[EventData], ...] = (TriggerRegistered, TriggerUpdated, TriggerDeleted, TriggerEnabled,
                                       TriggerDisabled, TriggerFired, TriggerFireSkipped)
