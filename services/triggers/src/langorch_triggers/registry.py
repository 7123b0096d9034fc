"""Every trigger registration and the status of every procedure version, kept current in memory from the event
stream (the source of truth), for the parts of a triggers replica that decide *when* to fire: the scheduler, the
file watcher and the ``LO_EXT`` event consumer.

Two ordered consumers replay ``lo.evt.trigger.>`` and ``lo.evt.procedure.>`` from the start and then follow them
live. :meth:`Registry.start` returns once both have caught up with the stream as it was when they started, so a
replica never acts on a partial view. A registration is *live* when it exists, is enabled and its version is
``active`` (api.md §10.1: the others are ``dormant`` and cannot fire by themselves).

Listeners (``Registry.listeners``) are called with the trigger id of every registration that changed, after the
change is applied, so the scheduler can re-plan one registration instead of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from ckp_core.events import EventEnvelope
from ckp_core.subjects import EVENT_STREAM
from ckp_core.triggers import TriggerState, evolve, trigger_id
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.jetstream import decode_message

log = logging.getLogger(__name__)

TRIGGER_EVENTS = "lo.evt.trigger.>"
PROCEDURE_EVENTS = "lo.evt.procedure.>"
Listener = Callable[[str], None]


class Registry:
    """The registrations (by trigger id) and version statuses (by ``(procedure_id, version)``) of one replica."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.triggers: dict[str, TriggerState] = {}
        self.statuses: dict[tuple[str, str], str] = {}
        self.projects: dict[tuple[str, str], str | None] = {}
        self.listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []

    # -- reading ----------------------------------------------------------------------------------------------

    def status_of(self, procedure_id: str, version: str) -> str | None:
        return self.statuses.get((procedure_id, version))

    def project_of(self, procedure_id: str, version: str) -> str | None:
        """The project a version was imported into (its runs belong to it)."""
        return self.projects.get((procedure_id, version))

    def dormant(self, state: TriggerState) -> bool:
        """Not ``active``: the registration cannot fire by itself (manual fires still can)."""
        return self.status_of(state.procedure_id or "", state.version or "") != "active"

    def live(self, trigger_type: str | None = None) -> list[TriggerState]:
        """Registrations that fire by themselves now: existing, enabled, not dormant (optionally of one type)."""
        return [s for s in self.triggers.values()
                if s.exists and s.enabled and not self.dormant(s)
                and (trigger_type is None or s.config.get("trigger_type") == trigger_type)]

    def is_live(self, tid: str) -> bool:
        state = self.triggers.get(tid)
        return state is not None and state.exists and state.enabled and not self.dormant(state)

    # -- following ----------------------------------------------------------------------------------------------

    async def start(self, timeout_s: float = 60.0) -> None:
        """Replay both subjects and keep following them; return once both have caught up."""
        caught_up = [asyncio.Event(), asyncio.Event()]
        self._tasks = [asyncio.create_task(self._follow(TRIGGER_EVENTS, self._apply_trigger, caught_up[0])),
                       asyncio.create_task(self._follow(PROCEDURE_EVENTS, self._apply_procedure, caught_up[1]))]
        waiting = [asyncio.create_task(e.wait()) for e in caught_up]
        try:
            async with asyncio.timeout(timeout_s):
                while not all(e.is_set() for e in caught_up):
                    done, _ = await asyncio.wait([*waiting, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
                    for task in done & set(self._tasks):
                        task.result()  # a follower that ended before catching up: raise its error
                        raise RuntimeError("a trigger registry follower ended before catching up")
        finally:
            for w in waiting:
                w.cancel()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # stopping: a follower's last error is moot
                await task
        self._tasks = []

    async def _follow(self, subject: str, apply: Callable[[EventEnvelope], str | None],
                      caught_up: asyncio.Event) -> None:
        sub = await self.js.subscribe(subject, ordered_consumer=True, stream=EVENT_STREAM,
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0 and (info.delivered is None or not info.delivered.consumer_seq):
                caught_up.set()  # nothing to replay
            while True:
                stop_if_cancelled()
                msg = await sub.next_msg(timeout=None)
                try:
                    changed = apply(decode_message(msg).envelope)
                except Exception:  # one undecodable event must not stop the view; it is logged and skipped
                    log.exception("trigger registry: event %s on %s not applied", msg.metadata.sequence.stream,
                                  msg.subject)
                    changed = None
                if not caught_up.is_set() and msg.metadata.num_pending == 0:
                    caught_up.set()
                if changed is not None:
                    self._notify(changed)
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    def _notify(self, tid: str) -> None:
        for listener in self.listeners:
            try:
                listener(tid)
            except Exception:  # a listener's bug must not stop the registry
                log.exception("trigger registry listener failed for %s", tid)

    def _apply_trigger(self, ev: EventEnvelope) -> str | None:
        state = self.triggers.get(ev.aggregate_id)
        if state is None:
            state = self.triggers[ev.aggregate_id] = TriggerState(ev.aggregate_id)
        evolve(state, ev, 0)
        return ev.aggregate_id if ev.type != "trigger_fired" else None

    def _apply_procedure(self, ev: EventEnvelope) -> str | None:
        d: dict[str, Any] = ev.data
        procedure_id, version = ev.aggregate_id, d.get("version")
        if not version:
            return None
        changed: list[tuple[str, str]] = []

        def put(v: str | None, status: str | None) -> None:
            if v is None:
                return
            key = (str(procedure_id), v)
            if status is None:
                self.statuses.pop(key, None)
            else:
                self.statuses[key] = status
            changed.append(key)

        if ev.type == "procedure_imported":
            put(version, str(d.get("status") or "draft"))
            self.projects[(str(procedure_id), version)] = d.get("project_id")
        elif ev.type == "procedure_status_changed":
            put(d.get("displaced_version"), "deprecated")
            put(version, str(d["status"]))
        elif ev.type == "procedure_promoted":
            put(d.get("displaced_version"), "deprecated")
            put(version, "active")
        elif ev.type == "procedure_rolled_back":
            put(version, "deprecated")
            put(d.get("restored_version"), "active")
        elif ev.type == "procedure_version_deleted":
            put(version, None)
            self.projects.pop((str(procedure_id), version), None)
        for pid, v in changed:
            tid = trigger_id(pid, v)
            if tid in self.triggers:
                self._notify(tid)
        return None
