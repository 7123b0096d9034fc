"""The one writer of audit records (api.md §12): every service publishes its ``AuditEntry`` through it.

A record is published awaited (so it is not lost on a normal path) with ``Nats-Msg-Id = audit:<command_id>``
(so a command handled twice yields one record within the duplicate window). Failing to write it is logged and
never breaks the command handling that called it: the command's outcome is already in ``LO_EVT``.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from ckp_core.audit import AuditEntry, outcome_entry
from ckp_core.commands import Command
from ckp_core.events import EventEnvelope
from ckp_core.subjects import audit_subject

log = logging.getLogger(__name__)


class AuditWriter:
    """Publishes audit records on ``lo.audit.<category>.<action>``."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def write(self, entry: AuditEntry) -> bool:
        """Publish one record; False (logged) when it could not be written."""
        try:
            await self.js.publish(audit_subject(entry.category, entry.action), entry.model_dump_json().encode(),
                                  headers={"Nats-Msg-Id": entry.msg_id})
        except (NatsError, OSError, ValueError):  # NATS down or slow, or a record that does not serialise
            log.warning("audit record %s/%s of %s not written", entry.category, entry.action,
                        entry.command_id or entry.event_id, exc_info=True)
            return False
        return True

    async def outcome(self, command: Command, event: EventEnvelope | None, **kwargs: Any) -> bool:
        """Record a command's outcome: ``event`` is the event it caused (``command_rejected`` → rejected), or
        None for an accepted no-op."""
        try:
            entry = outcome_entry(command, event, **kwargs)
        except Exception:  # a record that cannot be built must not fail the command either
            log.warning("audit record of command %s not built", command.command_id, exc_info=True)
            return False
        return await self.write(entry)
