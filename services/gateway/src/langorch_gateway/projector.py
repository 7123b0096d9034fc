"""The projectors: ``Projector`` applies ``LO_EVT`` to the projection tables (``TABLES``) exactly once, and
``AuditProjector`` applies ``LO_AUDIT`` to ``audit_log`` (api.md §12) with its own stored position. What each
event does to the tables is the projections' (:mod:`langorch_gateway.projections`, handlers keyed by event class).

Each batch of messages is applied in one transaction together with the new stream position, so a crash at
any point either keeps or loses the whole batch; messages at or below the stored position are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import asyncpg
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from ckp_core.audit import AuditEntry
from ckp_core.events import decode, upcast
from ckp_core.eventstore import StoredEvent
from ckp_core.subjects import AUDIT_STREAM, EVENT_STREAM
from langorch_gateway.projections import PROJECTIONS, Recorded, apply_audit_entry
from langorch_infra.bus import BusMetrics
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.jetstream import decode_message, stream_last_position

log = logging.getLogger(__name__)

NAME = "core"
TABLES = tuple(table for projection in PROJECTIONS for table in projection.tables)
AUDIT_NAME = "audit"
AUDIT_TABLES = ("audit_log",)
BATCH = 500


def schema_sql() -> str:
    return resources.files("langorch_gateway").joinpath("schema.sql").read_text()


async def ensure_schema(pool: asyncpg.Pool) -> None:
    """Create the projection tables if missing."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock(72021)")
        try:
            await conn.execute(schema_sql())
        finally:
            await conn.execute("SELECT pg_advisory_unlock(72021)")


async def drop_schema(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES + AUDIT_TABLES)}, projection_positions, "
                           "projection_dead_letters")


async def apply_event(conn: Any, stored: StoredEvent) -> None:
    """Apply one event to the tables (inside the caller's transaction): decoded once (upcast to its current schema
    version), then handed to every projection in order. An event of an unknown type reaches the projections as
    ``UnknownEvent``; a known one whose data does not validate raises, and the batch makes it a dead letter."""
    envelope = upcast(stored.envelope)
    event = decode(envelope)
    recorded = Recorded(envelope, stored.position)
    for projection in PROJECTIONS:
        await projection.apply(conn, event, recorded)


class _Positioned(Protocol):
    @property
    def position(self) -> int: ...


M = TypeVar("M", bound=_Positioned)


@dataclass(frozen=True)
class StoredAudit:
    """An audit record together with its ``LO_AUDIT`` position."""

    entry: AuditEntry
    position: int


@dataclass(frozen=True)
class Poison:
    """A message that cannot be decoded (it is recorded as a dead letter in its place)."""

    position: int
    subject: str
    error: str


def _connection_trouble(exc: BaseException) -> bool:
    """Errors that say nothing about the message itself: the batch is retried, never dead-lettered."""
    return isinstance(exc, (OSError, ConnectionError, TimeoutError, asyncpg.PostgresConnectionError,
                            asyncpg.InterfaceError, asyncpg.exceptions.OperatorInterventionError,
                            asyncpg.exceptions.InsufficientResourcesError))


class StreamProjector(ABC, Generic[M]):
    """Follows one stream from the position stored under ``NAME`` in ``projection_positions`` and applies its
    messages in batches; ``wait(position)`` serves read-your-writes. A failing batch is retried from the
    stored position (its transaction was rolled back), so a transient database error does not stop it.

    A **poison message** — one that cannot be decoded, or whose application fails for a reason other than the
    connection — must not stall every projection behind it: the batch is applied again one message at a time,
    each in a savepoint, and a message that fails is recorded in ``projection_dead_letters`` (name, position,
    subject, error) and skipped. The same message fails the same way in a rebuild, so live and rebuilt tables
    stay identical.
    """

    NAME: ClassVar[str]
    STREAM: ClassVar[str]
    SUBJECT: ClassVar[str]

    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext) -> None:
        self.pool = pool
        self.js = js
        self.position = 0
        self._advanced = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.bus: BusMetrics | None = None  # langorch_bus_* of the gateway (set by the app)

    @abstractmethod
    def decode(self, msg: Msg) -> M:
        """The stream message as the item this projector applies."""

    @abstractmethod
    async def apply(self, conn: Any, item: M) -> None:
        """Apply one item in the batch's transaction."""

    async def after_batch(self, conn: Any) -> None:
        """Work done with every batch, in its transaction (nothing by default)."""

    async def load_position(self) -> int:
        async with self.pool.acquire() as conn:
            pos = await conn.fetchval("SELECT position FROM projection_positions WHERE name = $1", self.NAME)
        self.position = int(pos or 0)
        return self.position

    async def apply_batch(self, batch: list[M | Poison]) -> None:
        try:
            await self._apply_batch(batch, isolate=False)
        except Exception as exc:  # a defect of any kind in one message: find it by applying one at a time
            if _connection_trouble(exc):
                raise
            log.warning("projection %s: a batch failed (%s); applying it message by message", self.NAME, exc)
            await self._apply_batch(batch, isolate=True)

    async def _apply_batch(self, batch: list[M | Poison], *, isolate: bool) -> None:
        fresh = [e for e in batch if e.position > self.position]
        if not fresh:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                "SELECT position FROM projection_positions WHERE name = $1 FOR UPDATE", self.NAME
            )
            floor = int(stored or 0)
            for e in fresh:
                if e.position <= floor:
                    continue
                if isinstance(e, Poison):
                    await self._dead_letter(conn, e.position, e.subject, e.error)
                elif not isolate:
                    await self.apply(conn, e)
                else:
                    try:
                        async with conn.transaction():  # a savepoint: a failure undoes this message only
                            await self.apply(conn, e)
                    except Exception as exc:  # any failure but the connection's makes this message poison
                        if _connection_trouble(exc):
                            raise
                        await self._dead_letter(conn, e.position, self.subject_of(e), f"{type(exc).__name__}: {exc}")
            await self.after_batch(conn)
            await conn.execute(
                """INSERT INTO projection_positions (name, position) VALUES ($1, $2)
                   ON CONFLICT (name) DO UPDATE SET position = GREATEST(projection_positions.position, $2)""",
                self.NAME, fresh[-1].position,
            )
        async with self._advanced:
            self.position = fresh[-1].position
            self._advanced.notify_all()

    def subject_of(self, item: M) -> str:
        """The subject an item came from, for a dead letter (the projector's filter when unknown)."""
        return self.SUBJECT

    async def _dead_letter(self, conn: Any, position: int, subject: str, error: str) -> None:
        log.error("projection %s: message %s on %s skipped as poison: %s", self.NAME, position, subject, error)
        await conn.execute(
            """INSERT INTO projection_dead_letters (name, position, subject, error) VALUES ($1, $2, $3, $4)
               ON CONFLICT (name, position) DO NOTHING""", self.NAME, position, subject, error[:2000])

    def _decode(self, msg: Msg) -> M | Poison:
        try:
            return self.decode(msg)
        except Exception as exc:  # whatever a message fails to decode with makes it poison, never stops the projection
            return Poison(msg.metadata.sequence.stream, msg.subject, f"{type(exc).__name__}: {exc}")

    async def run(self) -> None:
        """Consume forever; after a failure, start again from the stored position a second later."""
        while True:
            stop_if_cancelled()
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception:  # the consumer resumes from its stored position after any failure
                log.exception("projection %s failed; resuming from its stored position", self.NAME)
                await asyncio.sleep(1)

    async def _consume(self) -> None:
        """Consume from the stored position (an ordered consumer; no server-side state to clean)."""
        await self.load_position()
        start = self.position + 1
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        sub = await self.js.subscribe(self.SUBJECT, ordered_consumer=True, config=cfg, stream=self.STREAM,
                                      pending_msgs_limit=100_000)
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                started = time.monotonic()
                subjects = [msg.subject]
                batch = [self._decode(msg)]
                while len(batch) < BATCH and sub.pending_msgs > 0:
                    msg = await sub.next_msg()
                    subjects.append(msg.subject)
                    batch.append(self._decode(msg))
                await self.apply_batch(batch)
                if self.bus is not None:  # a batch shares one transaction: each message its share of the time
                    share = (time.monotonic() - started) / len(batch)
                    for subject, item in zip(subjects, batch, strict=True):
                        self.bus.observe(subject, "term" if isinstance(item, Poison) else "ack", share)
        finally:
            with contextlib.suppress(NatsError, OSError):  # the connection may be closed or draining already
                await sub.unsubscribe()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"projector-{self.NAME}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, position: int, timeout: float) -> bool:
        """Wait until the projection has applied ``position``; False on timeout."""
        async with self._advanced:
            try:
                await asyncio.wait_for(self._advanced.wait_for(lambda: self.position >= position), timeout)
            except TimeoutError:
                return False
        return True

    async def head(self) -> int:
        """The last sequence of the followed stream (0 when empty)."""
        info = await self.js.stream_info(self.STREAM)
        return int(info.state.last_seq)

    async def catch_up(self, timeout: float = 60) -> None:
        """Wait until everything in the stream right now has been applied."""
        head = await self.head()
        if not await self.wait(head, timeout):
            raise TimeoutError(f"projection {self.NAME} stuck at {self.position}, stream head {head}")


class Projector(StreamProjector[StoredEvent]):
    """Follows ``LO_EVT`` and keeps the projection tables current."""

    NAME = NAME
    STREAM = EVENT_STREAM
    SUBJECT = "lo.evt.>"

    def decode(self, msg: Msg) -> StoredEvent:
        return decode_message(msg)

    async def apply(self, conn: Any, item: StoredEvent) -> None:
        await apply_event(conn, item)

    def subject_of(self, item: StoredEvent) -> str:
        ev = item.envelope
        return f"lo.evt.{ev.aggregate}.{ev.aggregate_id}.{ev.type}"

    async def head(self) -> int:
        return await stream_last_position(self.js)


class AuditProjector(StreamProjector[StoredAudit]):
    """Follows ``LO_AUDIT`` into ``audit_log`` (api.md §12). Rows older than ``retention_days`` are deleted with
    every batch, as ``LO_AUDIT`` drops its messages after the same age, so a rebuild gives the same rows."""

    NAME = AUDIT_NAME
    STREAM = AUDIT_STREAM
    SUBJECT = "lo.audit.>"

    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, retention_days: int | None = None) -> None:
        super().__init__(pool, js)
        self.retention_days = retention_days

    async def after_batch(self, conn: Any) -> None:
        if self.retention_days is not None:
            await conn.execute("DELETE FROM audit_log WHERE ts < now() - make_interval(days => $1)",
                               self.retention_days)

    def decode(self, msg: Msg) -> StoredAudit:
        return StoredAudit(AuditEntry.model_validate_json(msg.data), msg.metadata.sequence.stream)

    async def apply(self, conn: Any, item: StoredAudit) -> None:
        await apply_audit_entry(conn, item.entry, item.position)


async def rebuild(pool: asyncpg.Pool, js: JetStreamContext, timeout: float = 300,
                  audit_retention_days: int | None = None) -> int:
    """Drop and recreate the projection tables, then replay ``LO_EVT`` and ``LO_AUDIT`` up to their current
    heads; returns the ``LO_EVT`` position reached."""
    await drop_schema(pool)
    await ensure_schema(pool)
    projector, audit = Projector(pool, js), AuditProjector(pool, js, audit_retention_days)
    projector.start()
    audit.start()
    try:
        await asyncio.gather(projector.catch_up(timeout), audit.catch_up(timeout))
    finally:
        await projector.stop()
        await audit.stop()
    return projector.position
