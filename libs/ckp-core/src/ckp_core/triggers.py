"""The trigger aggregate (api.md §10): one registration per procedure version, its state folded from its events,
the per-type validation of §10.2 and the decisions on the registration commands.

The triggers service decides with these functions; the gateway renders ``TriggerOut`` from the ``triggers``
projection, which applies the same events.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ckp_core.commands import DeleteTrigger, DisableTrigger, EnableTrigger, UpsertTrigger
from ckp_core.compiler.fields import valid_timezone
from ckp_core.errors import CommandRefused
from ckp_core.events import (
    EventData,
    EventEnvelope,
    TriggerDeleted,
    TriggerDisabled,
    TriggerEnabled,
    TriggerRegistered,
    TriggerUpdated,
    format_time,
)
from ckp_core.ir import ProcedureIR
from ckp_core.schedules import Schedule, ScheduleError, validate_cron

TRIGGER_TYPES = ("scheduled", "webhook", "event", "file_watch")
SIGNATURE_SCHEMES = ("timestamped", "body")
SOURCES = ("api", "ckp")
EVENT_PREFIX = "nats://"
EVENT_ROOT = "lo.ext."
CONFIG_FIELDS = ("trigger_type", "schedule", "timezone", "webhook_secret", "signature_scheme", "event_source",
                 "input_vars", "dedupe_window_seconds", "max_concurrent_runs", "enabled", "source")
"""The registration's configuration: what ``trigger_registered`` / ``trigger_updated`` carry."""
SYNCED_FIELDS = CONFIG_FIELDS[:-2]
"""What a document's ``trigger`` block decides (``enabled`` stays as an operator left it; ``source`` is ``ckp``)."""
MAX_SECRET_NAME = 200
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$|^\*$|^>$")


def trigger_id(procedure_id: str, version: str) -> str:
    """The aggregate id of a registration: ``<procedure_id>@<version>``."""
    return f"{procedure_id}@{version}"


@dataclass
class TriggerState:
    """One registration as its events leave it; ``exists`` is False before registration and after deletion."""

    trigger_id: str
    seq: int = 0
    position: int = 0
    exists: bool = False
    revision: int = 0
    procedure_id: str | None = None
    version: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    created_by: str | None = None
    updated_at: str | None = None
    last_fired_at: str | None = None
    last_run_id: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.config.get("enabled", False))


def evolve(state: TriggerState, ev: EventEnvelope, position: int) -> None:
    """Apply one event of the trigger aggregate. ``revision`` (the ``ETag``) counts the registration's changes
    since it was (last) created; fires do not change it."""
    d = ev.data
    state.seq, state.position = ev.seq, position
    at = format_time(ev.occurred_at)
    if ev.type in ("trigger_registered", "trigger_updated"):
        if ev.type == "trigger_registered" or not state.exists:
            state.created_at, state.created_by, state.revision = at, ev.actor.render(), 0
            state.last_fired_at = state.last_run_id = None
        state.exists = True
        state.revision += 1
        state.procedure_id, state.version = d.get("procedure_id"), d.get("version")
        state.config = {name: d.get(name) for name in CONFIG_FIELDS}
        state.updated_at = at
    elif ev.type in ("trigger_enabled", "trigger_disabled") and state.exists:
        state.config["enabled"] = ev.type == "trigger_enabled"
        state.revision += 1
        state.updated_at = at
    elif ev.type == "trigger_deleted":
        state.exists = False
        state.updated_at = at
    elif ev.type == "trigger_fired":
        state.last_fired_at, state.last_run_id = at, d.get("run_id")


def fold(trigger_id_: str, events: Iterable[tuple[EventEnvelope, int]]) -> TriggerState:
    state = TriggerState(trigger_id_)
    for ev, position in events:
        evolve(state, ev, position)
    return state


# -- validation (api.md §10.2) ----------------------------------------------------------------------------------


def valid_cron(expr: str) -> bool:
    """A 5-field cron expression the scheduler accepts (:func:`ckp_core.schedules.validate_cron` says why not)."""
    try:
        validate_cron(expr)
    except ScheduleError:
        return False
    return True


def _cron_error(expr: str) -> str | None:
    try:
        validate_cron(expr)
    except ScheduleError as exc:
        return exc.message
    return None


def ever_fires(expr: str) -> bool:
    """A valid expression with a slot at all (``0 0 31 2 *`` has none): one the scheduler can plan."""
    try:
        Schedule(" ".join(expr.split())).next_after(datetime(2000, 1, 1, tzinfo=UTC))
    except ValueError:  # croniter's CroniterBadDateError: no match within its search horizon
        return False
    return True


def event_subject(source: str) -> str | None:
    """The subject of a ``nats://lo.ext.<topic…>`` source (``*`` and ``>`` wildcards allowed), else None."""
    if not source.startswith(EVENT_PREFIX):
        return None
    subject = source[len(EVENT_PREFIX):]
    tokens = subject.split(".")
    if not subject.startswith(EVENT_ROOT) or len(tokens) < 3:
        return None
    if not all(_SUBJECT_TOKEN.match(t) for t in tokens) or ">" in tokens[:-1]:
        return None
    return subject


def validate(cmd: UpsertTrigger) -> dict[str, Any]:
    """The registration's configuration, normalised, or :class:`CommandRefused` with every failing field:
    ``unsupported_event_source`` when that is the only fault, else ``validation_failed`` (422, ``errors`` keyed
    by field)."""
    errors: dict[str, list[str]] = {}
    unsupported = False

    def fail(name: str, message: str) -> None:
        errors.setdefault(name, []).append(message)

    ttype = cmd.trigger_type
    config: dict[str, Any] = {"trigger_type": ttype, "schedule": None, "timezone": "UTC", "webhook_secret": None,
                              "signature_scheme": "timestamped", "event_source": None,
                              "input_vars": dict(cmd.input_vars), "dedupe_window_seconds": cmd.dedupe_window_seconds,
                              "max_concurrent_runs": cmd.max_concurrent_runs, "enabled": cmd.enabled,
                              "source": cmd.source}
    if ttype not in TRIGGER_TYPES:
        fail("trigger_type", f"Must be one of: {', '.join(TRIGGER_TYPES)}")
    if cmd.source not in SOURCES:
        fail("source", f"Must be one of: {', '.join(SOURCES)}")
    if cmd.dedupe_window_seconds < 0:
        fail("dedupe_window_seconds", "Must be 0 (off) or more")
    if cmd.max_concurrent_runs is not None and cmd.max_concurrent_runs < 1:
        fail("max_concurrent_runs", "Must be 1 or more, or null (no limit)")
    if ttype == "scheduled":
        if not cmd.schedule:
            fail("schedule", "This field is required for a scheduled trigger")
        elif (cron_error := _cron_error(cmd.schedule)) is not None:
            fail("schedule", cron_error)
        elif not ever_fires(cmd.schedule):
            fail("schedule", "Never fires: no date matches (such as 31 February)")
        else:
            config["schedule"] = " ".join(cmd.schedule.split())
        if cmd.timezone is not None:
            if valid_timezone(cmd.timezone):
                config["timezone"] = cmd.timezone
            else:
                fail("timezone", f"Unknown IANA time zone '{cmd.timezone}'")
    elif ttype == "webhook":
        if not cmd.webhook_secret or not cmd.webhook_secret.strip():
            fail("webhook_secret", "This field is required for a webhook trigger (the name of the signing secret)")
        elif len(cmd.webhook_secret) > MAX_SECRET_NAME:
            fail("webhook_secret", f"Must be at most {MAX_SECRET_NAME} characters")
        else:
            config["webhook_secret"] = cmd.webhook_secret
        scheme = cmd.signature_scheme or "timestamped"
        if scheme not in SIGNATURE_SCHEMES:
            fail("signature_scheme", f"Must be one of: {', '.join(SIGNATURE_SCHEMES)}")
        else:
            config["signature_scheme"] = scheme
            if scheme == "body" and cmd.dedupe_window_seconds <= 0:
                fail("dedupe_window_seconds", "Must be greater than 0 with signature_scheme 'body' (replay "
                     "protection rests on the dedupe window)")
    elif ttype == "event":
        if not cmd.event_source:
            fail("event_source", "This field is required for an event trigger (nats://lo.ext.<topic>)")
        elif event_subject(cmd.event_source) is None:
            unsupported = True
            fail("event_source", "Only nats:// sources under lo.ext.> are supported (e.g. "
                 "nats://lo.ext.orders.created)")
        else:
            config["event_source"] = cmd.event_source
    elif ttype == "file_watch":
        if not cmd.event_source or not cmd.event_source.strip():
            fail("event_source", "This field is required for a file_watch trigger (the watched path)")
        else:
            config["event_source"] = cmd.event_source
    if errors:
        if unsupported and list(errors) == ["event_source"]:
            raise CommandRefused("unsupported_event_source", f"event source '{cmd.event_source}' is not supported; "
                                 "use nats://lo.ext.<topic>", errors=errors)
        raise CommandRefused("validation_failed", "the trigger registration is invalid", errors=errors)
    return config


# -- decisions ------------------------------------------------------------------------------------------------


def _not_found(state: TriggerState) -> CommandRefused:
    return CommandRefused("not_found", f"no trigger is registered for {state.trigger_id}", resource="trigger")


def decide_upsert(state: TriggerState, cmd: UpsertTrigger) -> EventData:
    """``trigger_registered`` (new) or ``trigger_updated`` (a replacement, also with the same configuration: every
    accepted command is an event the submitter can wait for). ``expected_revision`` that does not match →
    ``precondition_failed``."""
    current = state.revision if state.exists else 0
    if cmd.source == "ckp" and state.exists and state.config.get("source") == "api":
        raise CommandRefused("trigger_registered_by_api", f"the trigger {state.trigger_id} was registered through "
                             "the API; a document's trigger block never replaces it")
    if cmd.expected_revision is not None and cmd.expected_revision != current:
        raise CommandRefused("precondition_failed", f"the trigger {state.trigger_id} is at revision {current}, "
                             f"not {cmd.expected_revision}", current_revision=current)
    config = validate(cmd)
    cls = TriggerUpdated if state.exists else TriggerRegistered
    return cls(procedure_id=cmd.procedure_id, version=cmd.version, **config)


def decide_delete(state: TriggerState, cmd: DeleteTrigger) -> EventData:
    if not state.exists:
        raise _not_found(state)
    return TriggerDeleted(procedure_id=cmd.procedure_id, version=cmd.version)


def decide_enable(state: TriggerState, cmd: EnableTrigger) -> EventData:
    """``trigger_enabled`` (also when it is enabled already: the answer is the same event)."""
    if not state.exists:
        raise _not_found(state)
    return TriggerEnabled(procedure_id=cmd.procedure_id, version=cmd.version)


def decide_disable(state: TriggerState, cmd: DisableTrigger) -> EventData:
    """``trigger_disabled`` (also when it is disabled already)."""
    if not state.exists:
        raise _not_found(state)
    return TriggerDisabled(procedure_id=cmd.procedure_id, version=cmd.version)


def fire_inputs(state: TriggerState, given: dict[str, Any]) -> dict[str, Any]:
    """The run's inputs: the registration's static ``input_vars`` with the fire's values over them."""
    return {**(state.config.get("input_vars") or {}), **given}


# -- registrations from documents (api.md §10.1 ``source: ckp``) ----------------------------------------------


def desired_registration(ir: ProcedureIR) -> dict[str, Any] | None:
    """The registration a version's compiled ``trigger`` block asks for (None: manual or no block, so no
    registration), in the normalised shape of :data:`SYNCED_FIELDS`."""
    t = ir.trigger
    if t is None or t.type == "manual":
        return None
    scheduled, webhook = t.type == "scheduled", t.type == "webhook"
    return {"trigger_type": t.type, "schedule": " ".join(t.schedule.split()) if scheduled and t.schedule else None,
            "timezone": t.timezone if scheduled else "UTC", "webhook_secret": t.webhook_secret if webhook else None,
            "signature_scheme": t.signature_scheme if webhook else "timestamped",
            "event_source": t.file_watch_path if t.type == "file_watch" else (
                t.event_source if t.type == "event" else None),
            "input_vars": dict(t.input_vars), "dedupe_window_seconds": t.dedupe_window_seconds,
            "max_concurrent_runs": t.max_concurrent_runs}


SyncAction = Literal["keep", "register", "remove"]


def sync_action(current: Mapping[str, Any] | None, desired: dict[str, Any] | None) -> SyncAction:
    """What reconciling one version's registration (``current``: its configuration, None when there is none)
    with its document's block (``desired``, from :func:`desired_registration`) takes. A ``source: api``
    registration is always kept: a document never replaces or removes it."""
    if current is not None and current.get("source") == "api":
        return "keep"
    if desired is None:
        return "keep" if current is None else "remove"
    if current is None:
        return "register"
    got = {name: current.get(name) for name in SYNCED_FIELDS}
    got["input_vars"] = dict(got["input_vars"] or {})
    if got["trigger_type"] != "webhook":
        got["signature_scheme"] = "timestamped"
    return "keep" if got == desired else "register"
