"""Service presence (api.md §14): every replica keeps ``service.<service>.<instance>`` in KV ``lo_presence``.

The value — service, instance id, version, start and last-seen times, the leader locks held and the effective
redacted settings — is re-put every third of its TTL (and at once when the held locks change), so the bucket
doubles as the replica registry: a replica that dies drops out when its TTL passes, one that stops cleanly
deletes its key. ``GET /api/config`` reads it back with :func:`read_presence`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from pydantic_settings import BaseSettings

from ckp_core.events import format_time
from ckp_core.subjects import PRESENCE_BUCKET, service_presence_key
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.jetstream import TRANSIENT_ERRORS
from langorch_infra.kv import kv_live, put_with_ttl
from langorch_infra.settings import effective_settings

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the held locks are compared with the published ones


def new_instance_id() -> str:
    """``<hostname>-<pid>-<8 hex>``: unique per process start, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Presence:
    """The presence key of one replica, kept alive by a task between :meth:`start` and :meth:`stop`."""

    def __init__(self, js: JetStreamContext, service: str, instance_id: str, version: str, settings: BaseSettings,
                 *, leader_of: Callable[[], list[str]] = list, ttl_s: float = 30.0) -> None:
        self.js = js
        self.service = service
        self.instance_id = instance_id
        self.version = version
        self.settings = effective_settings(settings)
        self.leader_of = leader_of
        self.ttl_s = max(1.0, ttl_s)
        self.key = service_presence_key(service, instance_id)
        self.started_at = format_time(datetime.now(UTC))
        self.published: list[str] | None = None
        self._task: asyncio.Task[None] | None = None

    def value(self, leader_of: list[str]) -> dict[str, Any]:
        return {"service": self.service, "instance_id": self.instance_id, "version": self.version,
                "started_at": self.started_at, "last_seen_at": format_time(datetime.now(UTC)),
                "leader_of": leader_of, "settings": self.settings}

    async def publish(self) -> None:
        """Put the key now (its TTL starts again)."""
        leader_of = sorted(self.leader_of())
        await put_with_ttl(self.js, PRESENCE_BUCKET, self.key, json.dumps(self.value(leader_of)).encode(),
                           self.ttl_s)
        self.published = leader_of

    async def start(self) -> None:
        """Publish once (so the replica is listed as soon as it runs), then keep the key alive."""
        await self.publish()
        self._task = asyncio.create_task(self._keep(), name=f"presence-{self.key}")

    async def _keep(self) -> None:
        interval = self.ttl_s / 3
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(min(POLL_S, interval))
            stop_if_cancelled()
            if loop.time() - last < interval and sorted(self.leader_of()) == self.published:
                continue
            try:
                await self.publish()
                last = loop.time()
            except asyncio.CancelledError:
                raise
            except TRANSIENT_ERRORS as exc:  # NATS restarting or unreachable: one line, not a traceback per put
                log.warning("presence %s: put failed (NATS unavailable: %s); trying again", self.key,
                            type(exc).__name__)
            except Exception:  # the renewal task must outlive any failure: the next put may succeed
                log.warning("presence %s: put failed", self.key, exc_info=True)

    async def stop(self, *, delete: bool = True) -> None:
        """Stop renewing; ``delete`` (a clean shutdown) removes the key at once instead of letting it expire."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await self._task
            self._task = None
        if delete:
            with contextlib.suppress(NatsError, OSError):  # the key expires by its TTL anyway
                kv = await self.js.key_value(PRESENCE_BUCKET)
                await kv.delete(self.key)


async def read_presence(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every live service replica in ``lo_presence`` (``service.*.*`` keys), ordered by service and instance."""
    out: list[dict[str, Any]] = []
    for _key, _revision, raw in await kv_live(js, PRESENCE_BUCKET, "service.*.*"):
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return sorted(out, key=lambda v: (str(v.get("service")), str(v.get("instance_id"))))
