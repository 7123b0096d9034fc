"""Callback deadlines of async workflow delegations (ckp.md §4.6): one elected replica watches them.

Every replica follows the delegation events (``workflow_delegated``, ``workflow_callback_received``,
``callback_timed_out``) to know the open delegations; only the holder of ``leader.callback_timer`` in
``lo_locks`` acts when one passes its ``expires_at``: it publishes ``lo.cmd.run.resume`` with status
``timed_out`` (one Nats-Msg-Id per delegation), and the runtime fails the step with ``callback_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from ckp_core.commands import ResumeRun
from ckp_core.events import Actor
from langorch_infra.cancel import cancel_and_wait, stop_if_cancelled
from langorch_infra.jetstream import follow, publish_command
from langorch_infra.kv import LeaderLock

log = logging.getLogger(__name__)

OPENED = "workflow_delegated"
CLOSED = ("workflow_callback_received", "callback_timed_out")


class CallbackTimer:
    def __init__(self, js: JetStreamContext, holder: str, actor: Actor, *, lock_ttl_s: float = 15.0,
                 tick_s: float = 0.5) -> None:
        self.js = js
        self.actor = actor
        self.lock = LeaderLock(js, "callback_timer", holder, lock_ttl_s)
        self.tick_s = tick_s
        self.open: dict[str, tuple[str, datetime]] = {}  # delegation id → (run id, expires_at)
        self.closed: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._follow(t), name=f"callback-timer-{t}") for t in (OPENED, *CLOSED)]
        self.tasks += [asyncio.create_task(self.lock.keep(), name="callback-timer-lock"),
                       asyncio.create_task(self._tick(), name="callback-timer-tick")]

    async def stop(self) -> None:
        await cancel_and_wait(self.tasks)
        with contextlib.suppress(NatsError, OSError):  # the lock expires by its TTL anyway
            await self.lock.release()

    async def _follow(self, event_type: str) -> None:
        async for stored in follow(self.js, f"lo.evt.run.*.{event_type}"):
            ev = stored.envelope
            delegation = str(ev.data.get("delegation_id") or "")
            if not delegation:
                continue
            if ev.type == OPENED and ev.data.get("expires_at") and delegation not in self.closed:
                expires = datetime.fromisoformat(str(ev.data["expires_at"]).replace("Z", "+00:00"))
                self.open[delegation] = (ev.aggregate_id, expires)
            elif ev.type in CLOSED:
                self.closed.add(delegation)
                self.open.pop(delegation, None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            stop_if_cancelled()
            if not self.lock.is_leader:
                continue
            now = datetime.now(UTC)
            for delegation, (run_id, expires) in list(self.open.items()):
                if expires > now:
                    continue
                try:
                    await publish_command(self.js, ResumeRun(
                        actor=self.actor, run_id=run_id, resume_reason="callback_timeout",
                        resolution={"wait_id": delegation, "status": "timed_out"}),
                        msg_id=f"callback-timeout-{delegation}")
                    self.open.pop(delegation, None)
                except (NatsError, OSError):  # NATS unavailable: the next tick tries again
                    log.warning("publishing the callback timeout of %s failed", delegation, exc_info=True)
