"""A local, push-updated view of a KV bucket for agent dispatch (KV ``lo_presence`` and ``lo_leases``).

An ordered consumer on the bucket's stream delivers the last message of every key, then every change, so choosing
an agent and a free lease slot needs no read round trip while the view is current. The view is a hint only: a
lease is still taken by a write conditional on the revision (a stale view makes it fail and the dispatcher reads
afresh), and the dispatcher reads afresh whenever the view shows nothing usable.

* :meth:`KvView.apply` keeps, per key, the entry with the highest revision: the watch's deliveries and this
  replica's own writes and deletes (which learn their revision from the write's acknowledgement, so the next step
  of a run never waits for the watch to see its own release) come in any order;
* a value written with a per-message TTL (``Nats-TTL``) counts as gone once its TTL has passed: the buckets keep
  no expiry markers, so an expired key simply has no message left (a conditional write over it expects 0);
* after a reconnection the view subscribes again from a fresh snapshot (the server may have lost the consumer,
  changes may have been missed) and is not :attr:`KvView.current` until it caught up with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.jetstream import RESUBSCRIBE_PATIENCE_S, WATCH_S, _patiently, reconnects

log = logging.getLogger(__name__)

__all__ = ["KvView", "ViewEntry", "ttl_seconds"]

CONSUMER_DELETE_TIMEOUT_S = 2.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def ttl_seconds(value: str | None) -> float | None:
    """A ``Nats-TTL`` header as seconds: whole seconds or a Go duration (``1m30s``); None for none or ``never``."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


@dataclass
class ViewEntry:
    """The newest message of one key this view knows of: ``value`` None for a delete or purge marker."""

    revision: int
    value: bytes | None
    expires: float | None = None  # time.monotonic() at which a value written with a TTL is gone
    _parsed: Any = None

    def alive(self, now: float) -> bool:
        return self.value is not None and (self.expires is None or now < self.expires)

    def json(self) -> dict[str, Any] | None:
        """The value as a JSON object (parsed once), None when it is not one."""
        if self._parsed is None:
            try:
                parsed = json.loads(self.value or b"{}")
            except ValueError:
                parsed = None
            self._parsed = parsed if isinstance(parsed, dict) else False
        return self._parsed or None


class KvView:
    """The keys of a KV bucket matching ``filters`` (key patterns), followed live; see the module docstring."""

    def __init__(self, js: JetStreamContext, bucket: str, filters: Sequence[str] = (">",)) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.prefix = f"$KV.{bucket}."
        self.filters = [self.prefix + f for f in filters]
        self.entries: dict[str, ViewEntry] = {}
        self.current = False  # caught up with a snapshot since the last (re)subscription
        self.changed = asyncio.Event()  # set on every applied change (waiters clear it)
        self._caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 10.0) -> bool:
        """Start following; wait until the view holds the bucket's state (True) or ``timeout_s`` passed (False:
        it is not :attr:`current` yet, and the dispatcher reads afresh until it is)."""
        self._task = asyncio.create_task(self._follow(), name=f"kv-view {self.bucket}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._caught_up.wait()), timeout_s)
        return self.current

    async def stop(self) -> None:
        self.current = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await self._task
            self._task = None

    # -- reading ----------------------------------------------------------------------------------------------

    def get(self, key: str) -> ViewEntry | None:
        return self.entries.get(key)

    def json(self, key: str, now: float | None = None) -> dict[str, Any] | None:
        """The live value of ``key`` as a JSON object (None when absent, deleted, expired or not an object)."""
        entry = self.entries.get(key)
        if entry is None or not entry.alive(time.monotonic() if now is None else now):
            return None
        return entry.json()

    def free_revision(self, key: str, now: float) -> int | None:
        """The revision a conditional write takes ``key`` over at when it is free (0: no message, else its delete
        marker's), None while it holds a live value."""
        entry = self.entries.get(key)
        if entry is None:
            return 0
        if entry.value is None:
            return entry.revision
        if entry.expires is not None and now >= entry.expires:
            return 0  # expired by its TTL: the server removed the message, leaving no marker
        return None

    # -- writing ----------------------------------------------------------------------------------------------

    def apply(self, key: str, revision: int, value: bytes | None, ttl_s: float | None = None,
              written_at: datetime | None = None) -> bool:
        """Record ``key`` at ``revision`` unless the view knows a newer (or the same) revision of it."""
        known = self.entries.get(key)
        if known is not None and known.revision >= revision:
            return False
        expires = None
        if value is not None and ttl_s is not None:
            left = ttl_s
            if written_at is not None:  # a message of the snapshot may be old already
                left = min(ttl_s, max(0.0, (written_at - datetime.now(UTC)).total_seconds() + ttl_s))
            expires = time.monotonic() + left
        self.entries[key] = ViewEntry(revision, value, expires)
        self.changed.set()
        return True

    def _apply_message(self, msg: Msg) -> None:
        key = msg.subject[len(self.prefix):]
        headers = msg.headers or {}
        meta = msg.metadata
        operation = headers.get("KV-Operation")
        deleted = operation in ("DEL", "PURGE") or (not msg.data and bool(headers.get("Nats-Marker-Reason")))
        self.apply(key, int(meta.sequence.stream), None if deleted else bytes(msg.data),
                   ttl_seconds(headers.get("Nats-TTL")), meta.timestamp)

    # -- following --------------------------------------------------------------------------------------------

    async def _subscribe(self) -> Any:
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, filter_subjects=list(self.filters))
        return await self.js.subscribe(self.filters[0], ordered_consumer=True, stream=self.stream, config=cfg)

    async def _follow(self) -> None:
        first = True
        while True:
            try:
                await self._follow_once(first)
            except asyncio.CancelledError:
                raise
            except Exception:  # NATS unavailable for long: the dispatcher reads afresh meanwhile
                log.warning("following KV %s failed; trying again", self.bucket, exc_info=True)
                await asyncio.sleep(0.5)
            first = False

    async def _follow_once(self, first: bool) -> None:
        """One subscription: a snapshot of the bucket, then its changes until the connection is re-established."""
        seen = reconnects(self.js)
        sub = await (self._subscribe() if first else _patiently(
            f"following KV {self.bucket}", self._subscribe, RESUBSCRIBE_PATIENCE_S, max_pause_s=0.5))
        # a fresh snapshot: what the view held may have changed unseen (or expired) while disconnected
        self.current = False
        self.entries.clear()
        try:
            info = await sub.consumer_info()
            # nothing delivered, nothing to deliver: the bucket holds no matching key (the delivered stream sequence
            # is the consumer's starting point, not a delivery, when the filters match nothing)
            if int(info.num_pending or 0) == 0 and int(info.delivered.consumer_seq or 0) == 0:
                self._mark_current()
            while reconnects(self.js) == seen:
                stop_if_cancelled()  # a read's wait_for may have swallowed it: the view stops, not follows on
                try:
                    msg = await sub.next_msg(timeout=WATCH_S)
                except nats.errors.TimeoutError:
                    continue
                self._apply_message(msg)
                if not self.current and msg.metadata.num_pending == 0:
                    self._mark_current()
        finally:
            self.current = False
            await self._end(sub)
        log.info("following KV %s again after a reconnection", self.bucket)

    def _mark_current(self) -> None:
        self.current = True
        self._caught_up.set()
        self.changed.set()

    async def _end(self, sub: Any) -> None:
        """Unsubscribe and delete the ordered consumer at once (not left to its inactivity threshold)."""
        name = getattr(sub, "_consumer", None)
        try:
            await sub.unsubscribe()
        except (nats.errors.Error, OSError):  # the connection may be closed or draining already
            log.debug("unsubscribe of the KV %s view failed", self.bucket, exc_info=True)
        if not name:
            return
        delete = partial(self.js.delete_consumer, self.stream, name)
        try:
            await asyncio.wait_for(delete(), CONSUMER_DELETE_TIMEOUT_S)
        except (nats.errors.Error, APIError, OSError, TimeoutError):
            log.debug("deleting the consumer %s of the KV %s view failed", name, self.bucket, exc_info=True)
