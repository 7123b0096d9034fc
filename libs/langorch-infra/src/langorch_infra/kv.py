"""KV helpers: per-key TTL writes and a leader lock in ``lo_locks`` (one replica does singleton work)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from ckp_core.subjects import LOCKS_BUCKET
from langorch_infra.cancel import stop_if_cancelled

log = logging.getLogger(__name__)


async def put_with_ttl(js: JetStreamContext, bucket: str, key: str, value: bytes, ttl_s: float,
                       *, last: int | None = None) -> int:
    """Write ``key`` so that it disappears ``ttl_s`` seconds (≥ 1, whole) after this write.

    ``last`` makes the write conditional on the key's current revision (0: the key must not exist).
    Buckets are created with per-message TTLs allowed (NATS ≥ 2.11).
    """
    headers = {"Nats-Expected-Last-Subject-Sequence": str(last)} if last is not None else None
    try:
        ack = await js.publish(f"$KV.{bucket}.{key}", value, headers=headers, msg_ttl=max(1, round(ttl_s)))
    except APIError as exc:
        if exc.err_code in (10071, 10164):
            raise KeyWrongLastSequenceError(description=exc.description) from exc
        raise
    return int(ack.seq)


async def kv_keys(js: JetStreamContext, bucket: str, pattern: str = ">") -> list[str]:
    """The keys of a KV bucket matching ``pattern`` (NATS subject wildcards), from the stream's subject index.

    A consistent snapshot in one request. nats-py's ``watch``/``keys`` signal "initial values done" from a consumer
    info that can race the first deliveries and end the listing before values that exist; this does not. Keys
    whose newest message is a delete, purge or TTL-expiry marker are listed too: read them with :func:`kv_live`.
    """
    prefix = f"$KV.{bucket}."
    try:
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + pattern)
    except NotFoundError:
        return []
    return sorted(subject[len(prefix):] for subject in (info.state.subjects or {}))


async def kv_live(js: JetStreamContext, bucket: str, pattern: str = ">") -> list[tuple[str, int, bytes]]:
    """``(key, revision, value)`` of the live keys matching ``pattern``: deleted, purged and expired ones skipped."""
    keys = await kv_keys(js, bucket, pattern)
    if not keys:
        return []
    kv = await js.key_value(bucket)
    out: list[tuple[str, int, bytes]] = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError, NotFoundError):
            continue
        if entry.value:  # a server-placed expiry marker (Nats-Marker-Reason) reads as an empty value
            out.append((key, int(entry.revision or 0), entry.value))
    return out


class LeaderLock:
    """Leadership of one singleton task, held as a TTL key in ``lo_locks`` and renewed every ``ttl_s / 3``.

    ``create`` is atomic, so at most one replica holds the key; a holder that stops renewing (crash, partition)
    loses it when the TTL expires, and another replica takes over at its next attempt.
    """

    def __init__(self, js: JetStreamContext, name: str, holder: str, ttl_s: float = 15.0) -> None:
        self.js = js
        self.name = name
        self.key = f"leader.{name}"
        self.holder = holder
        self.ttl_s = max(1.0, ttl_s)
        self.revision: int | None = None
        self.renewed_at = 0.0  # monotonic time of the last successful write
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self.revision is not None

    @property
    def held(self) -> bool:
        """Whether this replica holds the lock now: written by us and not yet past its TTL (no NATS call)."""
        return self.revision is not None and time.monotonic() - self.renewed_at < self.ttl_s

    async def try_acquire(self) -> bool:
        """Take the lock if free, or renew it if held by us; False when another holder has it."""
        value = self.holder.encode()
        try:
            if self.revision is None:
                self.revision = await put_with_ttl(self.js, LOCKS_BUCKET, self.key, value, self.ttl_s,
                                                   last=await self._free_revision())
                log.info("%s became leader of %s", self.holder, self.key)
            else:
                self.revision = await put_with_ttl(self.js, LOCKS_BUCKET, self.key, value, self.ttl_s,
                                                   last=self.revision)
            self.renewed_at = time.monotonic()
        except KeyWrongLastSequenceError:
            if self.revision is not None:
                log.warning("%s lost leadership of %s", self.holder, self.key)
            self.revision = None
        return self.revision is not None

    async def _free_revision(self) -> int:
        """The revision to write over when the lock is free: 0, or the delete marker a release left behind."""
        kv = await self.js.key_value(LOCKS_BUCKET)
        try:
            await kv.get(self.key)
        except (KeyDeletedError, KeyNotFoundError, NotFoundError) as missing:
            # a deleted key reads as not found but keeps its marker's revision; an expired one has none
            return int(getattr(getattr(missing, "entry", None), "revision", 0) or 0)
        return 0  # held by someone: the conditional write fails and we stay a follower

    async def release(self) -> None:
        """Give the lock up at once (on shutdown) so another replica need not wait for the TTL."""
        if self.revision is None:
            return
        kv = await self.js.key_value(LOCKS_BUCKET)
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError, NotFoundError, APIError):
            await kv.delete(self.key, last=self.revision)
        self.revision = None

    async def keep(self) -> None:
        """Try to acquire or renew forever (run as a task)."""
        while True:
            stop_if_cancelled()
            try:
                await self.try_acquire()
            except asyncio.CancelledError:
                raise
            except Exception:  # the lock task must outlive any failure: it tries again a third of the TTL later
                log.warning("leader lock %s: attempt failed", self.key, exc_info=True)
                self.revision = None
            await asyncio.sleep(self.ttl_s / 3)
