"""Concurrency slots (api.md §10.3): a procedure's runs that have not ended, any version and any origin, kept in
KV ``lo_locks`` so a fire's check of ``max_concurrent_runs`` and its taking of a slot are one atomic step.

One record per procedure, key ``slots.<procedure>``, value ``{run_id: taken_at}``, changed only with a revision
check (create, or update on the revision read; a concurrent change makes the writer read and decide again), so
two fires never both take the last slot. A fire takes its slot before its run is created; the
``triggers_run_slots`` consumer adds every created or retried run and removes every ended one.

A slot whose release was lost (a run ended while its ``run_created`` was not yet seen, a fire that crashed
between its slot and its creation and was never redelivered) would hold its procedure at the limit for ever, so a
fire that finds the limit reached checks the holders older than ``verify_after_s`` against their runs' last
events and frees those whose run ended, or whose run never appeared within ``stale_after_s`` (long enough for the
redeliveries of a fire whose run owner was away: a freed slot whose creation is still pending would let the run
start over the limit).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from ckp_core import runs
from ckp_core.events import EventEnvelope, format_time
from ckp_core.subjects import EVENT_STREAM, aggregate_filter, event_subject, kv_token

Held = dict[str, str]
"""``{run_id: taken_at}`` of one procedure."""


def slots_key(procedure_id: str) -> str:
    """``lo_locks`` key of a procedure's slots: ``slots.<procedure>``."""
    return f"slots.{kv_token(procedure_id)}"


def _age_s(taken_at: str) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(taken_at.replace("Z", "+00:00"))).total_seconds()


class Slots:
    """The slots of every procedure in ``kv`` (``lo_locks``); ``js`` reads runs' events for the checks."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, *, stale_after_s: float = 600.0,
                 verify_after_s: float = 10.0) -> None:
        self.js = js
        self.kv = kv
        self.stale_after_s = stale_after_s
        self.verify_after_s = verify_after_s

    async def held(self, procedure_id: str) -> Held:
        """The runs holding a slot of the procedure now."""
        return (await self._read(slots_key(procedure_id)))[0]

    async def acquire(self, procedure_id: str, run_id: str, limit: int) -> tuple[bool, int]:
        """Take a slot for ``run_id`` unless ``limit`` runs hold one: ``(granted, active_runs)``, the active runs
        counting this one when granted. A run that holds a slot already gets it again (a redelivered fire)."""
        key = slots_key(procedure_id)
        while True:
            held, revision = await self._read(key)
            if run_id in held:
                return True, len(held)
            if len(held) >= limit:
                ended = await self._ended(held)
                if not ended:
                    return False, len(held)
                held = {r: at for r, at in held.items() if r not in ended}
                if len(held) >= limit:
                    if await self._write(key, held, revision):
                        return False, len(held)
                    continue
            held[run_id] = format_time(datetime.now(UTC))
            if await self._write(key, held, revision):
                return True, len(held)

    async def track(self, procedure_id: str, run_id: str, taken_at: datetime | None = None) -> int:
        """Count a run that has not ended (a created or retried run of any origin), whatever the limit; returns
        the slots held."""
        key = slots_key(procedure_id)
        while True:
            held, revision = await self._read(key)
            if run_id in held:
                return len(held)
            held[run_id] = format_time(taken_at or datetime.now(UTC))
            if await self._write(key, held, revision):
                return len(held)

    async def release(self, procedure_id: str, run_id: str) -> int:
        """Free the run's slot (its run ended, or its creation was refused; a run without one is left alone);
        returns the slots held."""
        key = slots_key(procedure_id)
        while True:
            held, revision = await self._read(key)
            if held.pop(run_id, None) is None or await self._write(key, held, revision):
                return len(held)

    async def procedure_of(self, run_id: str) -> str | None:
        """The procedure of a run, from its ``run_created`` (None: no such run, or it was deleted)."""
        try:
            msg = await self.js.get_last_msg(EVENT_STREAM, event_subject("run", run_id, "run_created"))
        except NotFoundError:
            return None
        procedure = EventEnvelope.model_validate_json(msg.data or b"{}").data.get("procedure_id")
        return str(procedure) if procedure else None

    async def _read(self, key: str) -> tuple[Held, int | None]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return {}, None
        return dict(json.loads(entry.value or b"{}")), entry.revision

    async def _write(self, key: str, held: Held, revision: int | None) -> bool:
        """Store ``held`` if the record is still at ``revision`` (None: absent); False when another writer won."""
        value = json.dumps(held, sort_keys=True).encode()
        try:
            if revision is None:
                await self.kv.create(key, value)
            else:
                await self.kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _ended(self, held: Held) -> set[str]:
        """The holders older than ``verify_after_s`` whose run ended, or never appeared within ``stale_after_s``."""
        old = [r for r, at in held.items() if _age_s(at) >= self.verify_after_s]
        ends = await asyncio.gather(*(self._last_event(r) for r in old))
        return {r for r, last in zip(old, ends, strict=True)
                if (last is None and _age_s(held[r]) >= self.stale_after_s) or last in runs.ENDS}

    async def _last_event(self, run_id: str) -> str | None:
        try:
            msg = await self.js.get_last_msg(EVENT_STREAM, aggregate_filter("run", run_id))
        except NotFoundError:
            return None
        return EventEnvelope.model_validate_json(msg.data or b"{}").type
