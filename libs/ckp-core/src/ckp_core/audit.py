"""Audit records (api.md §12): one ``AuditEntry`` per command outcome, login, credential redemption and
recorded read, published on ``lo.audit.<category>.<action>`` (stream ``LO_AUDIT``).

``meta`` holds the command's parameters, redacted (api.md §1.7) and bounded: procedure documents and other
large values are summarised by size and SHA-256 instead of copied, so an audit record stays small.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.commands import Command
from ckp_core.events import Actor, EventEnvelope, utc_now
from ckp_core.ids import new_id
from ckp_core.redaction import Redactor

Outcome = Literal["accepted", "rejected"]

# (aggregate, verb) → (category, action) where the audit vocabulary differs from the command's (api.md §12)
_RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("procedure", "promote"): ("procedure_release", "promote"),
    ("procedure", "rollback"): ("procedure_release", "rollback"),
    ("lease", "release"): ("lease", "force_release"),
}
# command fields that are envelope, not parameters, or hashes nobody needs in an audit trail
_NOT_PARAMETERS = frozenset({"command_id", "actor", "causation_id", "token_sha256"})
# documents summarised by identity, size and hash instead of copied
_DOCUMENTS = frozenset({"ckp_json"})
VALUE_LIMIT = 4 * 1024


class AuditEntry(BaseModel):
    """One audit record (api.md §12)."""

    model_config = ConfigDict(extra="ignore")

    event_id: str = Field(default_factory=new_id)
    ts: datetime = Field(default_factory=utc_now)
    category: str
    action: str
    outcome: Outcome
    actor: str
    actor_kind: str
    description: str
    resource_type: str | None = None
    resource_id: str | None = None
    request_id: str | None = None
    command_id: str | None = None
    correlation_id: str | None = None
    auth_disabled: bool = True
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def msg_id(self) -> str:
        """``Nats-Msg-Id``: a command's record is ``audit:<command_id>``, so a redelivered command handled twice
        publishes one record within the stream's duplicate window."""
        return f"audit:{self.command_id or self.event_id}"


def category_action(command: Command) -> tuple[str, str]:
    """The audit ``category`` and ``action`` of a command (its aggregate and verb, with api.md §12's names)."""
    return _RENAMED.get((command.AGGREGATE, command.VERB), (command.AGGREGATE, command.VERB))


def command_resource(command: Command) -> tuple[str, str | None]:
    """(resource_type, resource_id): the aggregate the command addresses."""
    aggregate = command.AGGREGATE
    rid = getattr(command, f"{aggregate}_id", None)
    document = getattr(command, "ckp_json", None)
    if rid is None and isinstance(document, dict):
        rid = document.get("procedure_id")  # import: the id is inside the document
    return aggregate, (str(rid) if rid is not None else None)


def _size_hash(value: Any) -> tuple[int, str]:
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str).encode()
    return len(raw), hashlib.sha256(raw).hexdigest()


def _summary(value: Any) -> dict[str, Any]:
    size, digest = _size_hash(value)
    out: dict[str, Any] = {"_summarised": True, "bytes": size, "sha256": digest}
    if isinstance(value, dict):
        out |= {k: value[k] for k in ("procedure_id", "version") if isinstance(value.get(k), str)}
    return out


def bounded_meta(params: dict[str, Any], redactor: Redactor | None = None) -> dict[str, Any]:
    """Redact, then summarise documents and any value over ``VALUE_LIMIT`` bytes (size + sha256)."""
    redacted = (redactor or Redactor()).redact(params)
    out: dict[str, Any] = {}
    for key, value in redacted.items():
        if key in _DOCUMENTS or _size_hash(value)[0] > VALUE_LIMIT:
            out[key] = _summary(value)
        else:
            out[key] = value
    return out


def command_entry(
    command: Command,
    outcome: Outcome,
    *,
    code: str | None = None,
    detail: str | None = None,
    sensitive_keys: Iterable[str] = (),
    sensitive_values: Iterable[str] = (),
    extra_meta: dict[str, Any] | None = None,
    correlation_id: str | None = None,
) -> AuditEntry:
    """The audit record of one command's outcome. Its ``event_id`` is the command id, so the projection keeps
    exactly one record per command even when a redelivery publishes it again after the duplicate window."""
    category, action = category_action(command)
    resource_type, resource_id = command_resource(command)
    params = command.model_dump(mode="json", exclude=set(_NOT_PARAMETERS))
    meta = bounded_meta({**params, **(extra_meta or {})},
                        Redactor(extra_keys=sensitive_keys, values=sensitive_values))
    if outcome == "rejected":
        meta["code"] = code
    run_id = getattr(command, "run_id", None)
    return AuditEntry(
        event_id=command.command_id, category=category, action=action, outcome=outcome,
        actor=command.actor.render(), actor_kind=command.actor.kind,
        description=describe(category, action, resource_type, resource_id, outcome, code, detail),
        resource_type=resource_type, resource_id=resource_id, request_id=command.causation_id,
        command_id=command.command_id, correlation_id=correlation_id or (str(run_id) if run_id else None),
        auth_disabled=command.actor.kind == "anonymous", meta=meta,
    )


def outcome_entry(command: Command, event: EventEnvelope | None, **kwargs: Any) -> AuditEntry:
    """The record of a command whose outcome is ``event`` (``command_rejected`` → rejected with its code);
    ``None`` means the command was accepted without changing anything (a no-op)."""
    if event is not None and event.type == "command_rejected":
        return command_entry(command, "rejected", code=str(event.data.get("code")),
                             detail=event.data.get("detail"), correlation_id=event.correlation_id, **kwargs)
    extra = dict(kwargs.pop("extra_meta", None) or {})
    if event is None:
        extra["noop"] = True
    return command_entry(command, "accepted", extra_meta=extra,
                         correlation_id=event.correlation_id if event else None, **kwargs)


def describe(category: str, action: str, resource_type: str | None, resource_id: str | None, outcome: Outcome,
             code: str | None = None, detail: str | None = None) -> str:
    """One line a person reads in the audit list: what, on which resource, and how it ended."""
    target = f" {resource_type} {resource_id}" if resource_id else (f" {resource_type}" if resource_type else "")
    text = f"{category}/{action}{target}: {outcome}"
    if outcome == "rejected" and code:
        text += f" ({code}{': ' + detail if detail else ''})"
    return text[:1000]


def record_entry(category: str, action: str, actor: Actor, *, outcome: Outcome = "accepted",
                 resource_type: str | None = None, resource_id: str | None = None, request_id: str | None = None,
                 correlation_id: str | None = None, meta: dict[str, Any] | None = None,
                 code: str | None = None, detail: str | None = None,
                 auth_disabled: bool | None = None) -> AuditEntry:
    """A record that is not a command outcome: a recorded read (``checkpoint_viewed``), a credential
    redemption (``secret_mgmt/redeem``), a login. ``auth_disabled``: whether the gateway served it in
    auth-disabled mode (api.md §2.4); by default, whether the actor is ``anonymous``."""
    body = bounded_meta(meta or {})
    if outcome == "rejected":
        body["code"] = code
    return AuditEntry(
        category=category, action=action, outcome=outcome, actor=actor.render(), actor_kind=actor.kind,
        description=describe(category, action, resource_type, resource_id, outcome, code, detail),
        resource_type=resource_type, resource_id=resource_id, request_id=request_id,
        correlation_id=correlation_id,
        auth_disabled=actor.kind == "anonymous" if auth_disabled is None else auth_disabled, meta=body,
    )
