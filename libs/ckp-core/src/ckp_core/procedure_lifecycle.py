"""The procedure aggregate (all versions of one ``procedure_id``): state folded from its events, and the pure
decisions of api.md §4.3–4.5 (replace, delete, status lifecycle, promote, rollback).

No I/O here: the compiler service reads the aggregate's events, folds them with :func:`fold`, asks a
``decide_*`` function, and appends what it returns (or a ``command_rejected`` for a :class:`CommandRefused`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ckp_core.errors import CommandRefused
from ckp_core.events import EventEnvelope

CHANNELS = ("dev", "qa", "prod")
CHANNEL_RANK = {c: i for i, c in enumerate(CHANNELS, start=1)}
STATUSES = ("draft", "active", "deprecated", "archived")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "draft": ("active", "archived"),
    "active": ("deprecated", "archived"),
    "deprecated": ("active", "archived"),
    "archived": (),
}


@dataclass
class VersionState:
    """One stored version as the aggregate knows it."""

    version: str
    status: str
    release_channel: str
    revision: int
    ckp_json: dict[str, Any]
    content_hash: str
    ir_key: str
    promoted_from_version: str | None = None


@dataclass
class ProcedureState:
    """Every live (not deleted) version of one procedure, and where its stream ends."""

    procedure_id: str
    versions: dict[str, VersionState] = field(default_factory=dict)
    seq: int = 0
    position: int = 0

    def active_in(self, channel: str) -> VersionState | None:
        return next((v for v in self.versions.values()
                     if v.status == "active" and v.release_channel == channel), None)

    def get(self, version: str) -> VersionState:
        found = self.versions.get(version)
        if found is None:
            raise CommandRefused("not_found", f"procedure {self.procedure_id} version {version} not found",
                                 resource="procedure")
        return found


def evolve(state: ProcedureState, ev: EventEnvelope, position: int = 0) -> None:
    """Apply one event of the aggregate to ``state`` (in place)."""
    state.seq = ev.seq
    state.position = position or state.position
    d = ev.data
    v = state.versions.get(str(d.get("version")))
    if ev.type == "procedure_imported":
        state.versions[d["version"]] = VersionState(
            version=d["version"], status=d.get("status", "draft"), release_channel=d.get("release_channel", "dev"),
            revision=1, ckp_json=d["ckp_json"], content_hash=d["content_hash"], ir_key=d["ir_key"])
    elif v is None:
        return
    elif ev.type == "procedure_replaced":
        v.ckp_json, v.content_hash, v.revision = d["ckp_json"], d["content_hash"], v.revision + 1
    elif ev.type == "procedure_version_deleted":
        del state.versions[v.version]
    elif ev.type == "procedure_status_changed":
        v.status, v.revision = d["status"], v.revision + 1
        _deprecate(state, d.get("displaced_version"))
    elif ev.type == "procedure_promoted":
        _deprecate(state, d.get("displaced_version"))
        v.status, v.release_channel, v.revision = "active", d["target_channel"], v.revision + 1
        v.promoted_from_version = d.get("displaced_version")
    elif ev.type == "procedure_rolled_back":
        _deprecate(state, v.version)
        restored = state.versions.get(d["restored_version"])
        if restored is not None:
            restored.status, restored.revision = "active", restored.revision + 1
            restored.promoted_from_version = v.version


def _deprecate(state: ProcedureState, version: str | None) -> None:
    displaced = state.versions.get(version) if version else None
    if displaced is not None:
        displaced.status, displaced.revision = "deprecated", displaced.revision + 1


def fold(procedure_id: str, events: Iterable[tuple[EventEnvelope, int]]) -> ProcedureState:
    """The aggregate's state after ``(event, position)`` pairs in stream order."""
    state = ProcedureState(procedure_id)
    for ev, position in events:
        evolve(state, ev, position)
    return state


def check_revision(v: VersionState, expected: int | None) -> None:
    if expected is not None and expected != v.revision:
        raise CommandRefused("precondition_failed", f"version {v.version} is at revision {v.revision}, "
                             f"not {expected}", current_revision=v.revision)


def decide_replace(state: ProcedureState, version: str, expected_revision: int | None) -> VersionState:
    """A replace needs a ``draft`` version at the expected revision."""
    v = state.get(version)
    check_revision(v, expected_revision)
    if v.status != "draft":
        raise CommandRefused("version_not_draft", f"version {version} is {v.status}; only drafts can be "
                             "replaced (import a new version instead)", current_status=v.status)
    return v


def decide_delete(state: ProcedureState, version: str, expected_revision: int | None) -> VersionState:
    """Active versions cannot be deleted; deprecate or archive them first."""
    v = state.get(version)
    check_revision(v, expected_revision)
    if v.status == "active":
        raise CommandRefused("procedure_version_active", f"version {version} is active in {v.release_channel}; "
                             "deprecate or archive it first", current_status=v.status)
    return v


def decide_status(state: ProcedureState, version: str, status: str) -> tuple[VersionState, str | None] | None:
    """``None`` for a no-op; else the version and the version it displaces in its channel (activation)."""
    v = state.get(version)
    if status == v.status:
        return None
    if status not in TRANSITIONS[v.status]:
        raise CommandRefused("invalid_status_transition", f"version {version} cannot go from {v.status} to "
                             f"{status}", current_status=v.status, allowed=list(TRANSITIONS[v.status]))
    displaced = state.active_in(v.release_channel) if status == "active" else None
    return v, displaced.version if displaced is not None and displaced.version != version else None


def decide_promote(state: ProcedureState, version: str, target: str) -> tuple[VersionState, str | None] | None:
    """``None`` for a no-op (already active there); else the version and the one it displaces."""
    v = state.get(version)
    if v.status == "archived":
        raise CommandRefused("invalid_promotion", f"version {version} is archived", current_status=v.status)
    if CHANNEL_RANK[target] < CHANNEL_RANK[v.release_channel]:
        raise CommandRefused("invalid_promotion", f"version {version} is in {v.release_channel}; it cannot be "
                             f"promoted down to {target}", current_channel=v.release_channel)
    if v.status == "active" and v.release_channel == target:
        return None
    displaced = state.active_in(target)
    return v, displaced.version if displaced is not None else None


def decide_rollback(state: ProcedureState, version: str, target_channel: str,
                    rollback_to: str | None) -> VersionState:
    """The version to restore in ``target_channel`` in place of ``version`` (api.md §4.5)."""
    v = state.get(version)
    if v.status != "active" or v.release_channel != target_channel:
        raise CommandRefused("invalid_rollback", f"version {version} is not active in {target_channel}",
                             current_status=v.status, current_channel=v.release_channel)
    wanted = rollback_to or v.promoted_from_version
    if wanted is None:
        raise CommandRefused("invalid_rollback", f"version {version} has no previous version in "
                             f"{target_channel}; name rollback_to_version")
    target = state.versions.get(wanted)
    if target is None:
        raise CommandRefused("invalid_rollback", f"version {wanted} does not exist")
    if target.version == version:
        raise CommandRefused("invalid_rollback", "a version cannot be rolled back to itself")
    if target.release_channel != target_channel:
        raise CommandRefused("invalid_rollback", f"version {wanted} is in {target.release_channel}, not "
                             f"{target_channel}")
    if target.status in ("draft", "archived"):
        raise CommandRefused("invalid_rollback", f"version {wanted} is {target.status}")
    return target
