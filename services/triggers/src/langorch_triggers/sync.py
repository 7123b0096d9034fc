"""Registrations from documents' ``trigger`` blocks, kept in step with activations (api.md §10.1, ``source: ckp``).

The durable consumer ``triggers_sync`` (one for the deployment, shared by every replica) takes the procedure
events that make a version ``active``: an activation (``procedure_status_changed`` to ``active``), a promotion and
a rollback (its restored version). For that version — if it is still active when the event is handled — the
compiled IR in ``lo_procedures`` says which registration its block asks for, and the service's own command handler
registers or updates it, or removes a ``source: ckp`` registration the block no longer asks for (a ``manual`` block
or none). A ``source: api`` registration is never touched. The event is acked once that is decided.

A version that stops being active (deprecated, archived, displaced by an activation or a promotion, rolled back)
keeps its registration: it is ``dormant`` by its status and fires again if the version is re-activated.

The command's id is derived from the event's, so a redelivered event finds the outcome its first delivery appended
instead of deciding again. An IR the compiler has not written yet (it writes it after the event) is waited for by
a delayed redelivery; an unreadable one is logged and left to ``POST /api/triggers/sync``, which reports it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from faststream.exceptions import NackMessage
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from ckp_core.commands import Command, DeleteTrigger, UpsertTrigger
from ckp_core.events import Actor, EventData, EventEnvelope
from ckp_core.ir import ProcedureIR
from ckp_core.procedure_lifecycle import fold as fold_procedure
from ckp_core.subjects import PROCEDURES_BUCKET, procedure_key
from ckp_core.triggers import TriggerState, decide_delete, decide_upsert, desired_registration, sync_action, trigger_id
from langorch_infra import messaging

if TYPE_CHECKING:
    from langorch_triggers.service import TriggersService

log = logging.getLogger(__name__)

ACTOR = Actor.system("triggers")
IR_RETRY_S = 2.0
_COMMAND_IDS = uuid.UUID("5b0e4a52-3f7c-4d1e-9a4b-7c2f1d6e8a90")
"""Namespace of the commands' ids (UUIDv5 of the event id)."""


def activated_version(event_type: str, data: Mapping[str, Any]) -> str | None:
    """The version an activation, a promotion or a rollback made ``active`` (None for any other change)."""
    if event_type == "procedure_status_changed":
        return str(data["version"]) if data.get("status") == "active" else None
    if event_type == "procedure_promoted":
        return str(data["version"])
    if event_type == "procedure_rolled_back":
        return str(data["restored_version"])
    return None


def sync_command_id(event_id: str) -> str:
    """The id of the registration command an event causes: the same for every delivery of that event."""
    return str(uuid.uuid5(_COMMAND_IDS, f"trigger-sync:{event_id}"))


class TriggerSync:
    """The ``triggers_sync`` consumer of one replica, deciding through ``service``'s command handler."""

    def __init__(self, service: TriggersService) -> None:
        self.service = service
        self.subscription = messaging.Subscription(service.broker, messaging.PROCEDURE_ACTIVATIONS).handle(
            {subject: self.on_event for subject in messaging.PROCEDURE_ACTIVATIONS.messages})
        self._kv: KeyValue | None = None

    async def on_event(self, ev: EventEnvelope) -> None:
        data: dict[str, Any] = ev.model_dump(mode="json", include={"data"})["data"]
        version = activated_version(ev.type, data)
        if version is None:
            return
        procedure_id = str(data["procedure_id"])
        history = await self.service.store.read("procedure", procedure_id)
        procedure = fold_procedure(procedure_id, ((e.envelope, e.position) for e in history))
        now = procedure.versions.get(version)
        if now is None or now.status != "active":
            return  # deactivated or deleted since: its registration (if any) is dormant
        await self.reconcile(procedure_id, version, ev.event_id)

    async def reconcile(self, procedure_id: str, version: str, event_id: str) -> None:
        """Bring the version's ``source: ckp`` registration to what its compiled block asks for."""
        ir = await self._ir(procedure_id, version)
        if ir is None:
            return
        desired = desired_registration(ir)
        tid = trigger_id(procedure_id, version)
        state = await self.service.load(procedure_id, version)
        action = sync_action(_config(state), desired)
        if action == "keep":
            return
        common: dict[str, Any] = {"command_id": sync_command_id(event_id), "actor": ACTOR, "causation_id": event_id,
                                  "procedure_id": procedure_id, "version": version}
        command: Command
        decision: Callable[[TriggerState], EventData]
        if desired is None:  # "remove": the block asks for no registration
            delete = DeleteTrigger(**common)
            command, command_type, decision = delete, "delete_trigger", lambda s: decide_delete(s, delete)
        else:  # "register"
            upsert = UpsertTrigger(**common, source="ckp", enabled=state.enabled if state.exists else True,
                                   **desired)
            command, command_type, decision = upsert, "upsert_trigger", lambda s: decide_upsert(s, upsert)

        def decide(current: TriggerState) -> EventData | None:
            """The same reconciliation on the state the handler read (an API registration may have landed)."""
            return decision(current) if sync_action(_config(current), desired) == action else None

        handled = await self.service.handler.handle(tid, command, decide, command_type=command_type)
        event = handled.event
        if event is not None and event.type == "command_rejected":
            log.warning("the trigger block of %s@%s was not registered: %s %s", procedure_id, version,
                        event.data.get("code"), event.data.get("extra", {}).get("errors") or event.data.get("detail"))
        elif event is not None and not handled.replayed:
            log.info("trigger of %s@%s synced from its document: %s", procedure_id, version, event.type)

    async def _ir(self, procedure_id: str, version: str) -> ProcedureIR | None:
        if self._kv is None:
            self._kv = await self.service.js.key_value(PROCEDURES_BUCKET)
        try:
            entry = await self._kv.get(procedure_key(procedure_id, version))
        except KeyNotFoundError:
            log.info("the compiled %s@%s is not stored yet; the event is handled again", procedure_id, version)
            raise NackMessage(delay=IR_RETRY_S) from None
        try:
            return ProcedureIR.model_validate_json(entry.value or b"{}")
        except ValidationError:
            log.error("the compiled %s@%s is not readable; its trigger block is not synced (POST "
                      "/api/triggers/sync reports it)", procedure_id, version)
            return None


def _config(state: TriggerState) -> dict[str, Any] | None:
    return state.config if state.exists else None
