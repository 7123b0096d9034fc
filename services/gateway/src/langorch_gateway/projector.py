"""The projectors: ``Projector`` applies ``LO_EVT`` to the projection tables (``TABLES``) exactly once, and
``AuditProjector`` applies ``LO_AUDIT`` to ``audit_log`` (api.md §12) with its own stored position. What each
event does to the tables is the projections' (:mod:`langorch_gateway.projections`, handlers keyed by event class).

Each batch of messages is applied in one transaction together with the new stream position, so a crash at
any point either keeps or loses the whole batch; messages at or below the stored position are skipped. The
handlers' writes of a batch are collected and sent grouped by statement (:class:`StatementBatch`): a batch takes
a few round trips to PostgreSQL whatever its size, instead of one or two per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import asyncpg
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from ckp_core.audit import AuditEntry
from ckp_core.events import decode, upcast
from ckp_core.eventstore import StoredEvent
from ckp_core.subjects import AUDIT_STREAM, EVENT_STREAM
from langorch_gateway.pool import advisory_lock
from langorch_gateway.projections import PROJECTIONS, Projection, Recorded, apply_audit_entry
from langorch_infra import tracing
from langorch_infra.bus import BusMetrics, subject_template
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.hosting import Drain
from langorch_infra.jetstream import TRANSIENT_ERRORS, WATCH_S, decode_message, reconnects, stream_last_position

log = logging.getLogger(__name__)

NAME = "core"
TABLES = tuple(table for projection in PROJECTIONS for table in projection.tables)
AUDIT_NAME = "audit"
AUDIT_TABLES = ("audit_log",)
BATCH = 500
PENDING = 100_000
"""Messages received and not yet applied, at most (then the consumer's flow control holds the server back)."""
LIVE_PENDING = 256
"""A projector whose last received message left at most this many undelivered is live: a command's outcome is
received within a few milliseconds of being appended (:meth:`Projector.expect`)."""
IDLE_CHECK_S = 2.0
"""A projector that received nothing for this long compares its position with the stream head: behind means its
consumer is lost (a NATS restart or a node's loss without a reconnection here), and it subscribes again."""
STORED_POLL_S = 0.1  # a read-your-writes wait reads the stored position again this often (see StreamProjector.wait)
YIELD_EVERY = 64
"""Messages decoded, or applied to a batch's statements, between two turns given to the rest of the event loop: the
gateway serves the API on the loop the projector decodes and applies on, and a batch of ``BATCH`` messages handled
in one go held every request for tens of milliseconds."""
GATHER_S = 0.005
GATHER_BELOW = 32
"""A batch of fewer than ``GATHER_BELOW`` received messages waits up to ``GATHER_S`` for more before it is applied,
unless a read-your-writes wait (:meth:`StreamProjector.wait`) is pending or begins meanwhile. A batch costs a
transaction of a few round trips whatever its size, and at moderate rates the batches were of 2-4 events: at 1,000
events/s (bench/projection.py) the projector used 0.22-0.31 of a core with them, 0.18-0.19 with batches of about 10
gathered for 5 ms; an event nobody waits for is applied up to 5 ms later."""
MOVED_ON = "LO001"
"""The SQLSTATE a batch's commit fails with when another projector of the same name moved the position on."""


def schema_sql() -> str:
    return resources.files("langorch_gateway").joinpath("schema.sql").read_text()


async def ensure_schema(pool: asyncpg.Pool) -> None:
    """Create the projection tables if missing."""
    async with pool.acquire() as conn, advisory_lock(conn, 72021):
        await conn.execute(schema_sql())


async def drop_schema(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES + AUDIT_TABLES)}, projection_positions, "
                           "projection_dead_letters")


def _by_aggregate() -> dict[str, tuple[Projection, ...]]:
    found: dict[str, list[Projection]] = {}
    for projection in PROJECTIONS:
        found.setdefault(projection.aggregate, []).append(projection)
    return {aggregate: tuple(projections) for aggregate, projections in found.items()}


BY_AGGREGATE = _by_aggregate()
"""The projections of each aggregate's events, in the order of :data:`PROJECTIONS` (the others ignore them)."""


async def apply_event(conn: Any, stored: StoredEvent) -> None:
    """Apply one event to the tables (inside the caller's transaction): decoded once (upcast to its current schema
    version), then handed to every projection of its aggregate in order. An event of an unknown type reaches the
    projections as ``UnknownEvent``; a known one whose data does not validate raises, and the batch makes it a dead
    letter (also when no projection follows its aggregate)."""
    envelope = upcast(stored.envelope)
    event = decode(envelope)
    recorded = Recorded(envelope, stored.position)
    for projection in BY_AGGREGATE.get(envelope.aggregate, ()):
        await projection.apply(conn, event, recorded)


TABLE_OF_STATEMENT = re.compile(r"\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)", re.IGNORECASE)


class StatementBatch:
    """The writes of a batch's handlers, collected (``execute`` as on a connection) and then sent in few round trips.

    A statement is keyed by the table it writes and the **owner** of the item being applied (an event's aggregate):
    a projection writes only rows of the aggregate whose event it applies, and no handler reads, so statements with
    different keys commute, and only those with the same key keep their order. The statements are sent in *waves*,
    and in a wave grouped by their SQL text, each group one ``executemany`` (a single pipelined round trip that
    executes its rows in order). A statement joins the group of the last statement of its key when it has the same
    SQL text, and otherwise goes to the wave after that statement's. A statement whose table is not recognised, or
    one without an owner, is a barrier: alone in its wave, after everything before it and before everything after.
    """

    def __init__(self) -> None:
        self.owner: Hashable | None = None
        self._waves: list[dict[str, list[tuple[Any, ...]]]] = []
        self._last: dict[tuple[str, Hashable], tuple[int, str]] = {}  # the wave and SQL of each key's last
        self._floor = 0

    async def execute(self, sql: str, *args: Any) -> None:
        """Collect one statement of the item owned by ``owner``."""
        table = TABLE_OF_STATEMENT.match(sql)
        if table is None or self.owner is None:
            wave = len(self._waves)
            self._floor = wave + 1
        else:
            key = (table[1].lower(), self.owner)
            last = self._last.get(key)
            if last is None:
                wave = self._floor
            elif last[1] == sql and last[0] >= self._floor:
                wave = last[0]
            else:
                wave = max(self._floor, last[0] + 1)
            self._last[key] = wave, sql
        while len(self._waves) <= wave:
            self._waves.append({})
        self._waves[wave].setdefault(sql, []).append(args)

    async def send(self, conn: Any) -> int:
        """Execute every collected statement on ``conn`` (in the caller's transaction); the round trips it took."""
        trips = 0
        for wave in self._waves:
            for sql, rows in wave.items():
                if len(rows) == 1:
                    await conn.execute(sql, *rows[0])
                else:
                    await conn.executemany(sql, rows)
                trips += 1
        self._waves, self._last, self._floor = [], {}, 0
        return trips


class _Positioned(Protocol):
    @property
    def position(self) -> int: ...


M = TypeVar("M", bound=_Positioned)
T = TypeVar("T")


class Resubscribe(Exception):
    """The projector's ordered consumer is to be created again from the stored position."""


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
        # the gateway's stop: a read-your-writes wait then ends before the server cuts its request off
        self.drain: Drain | None = None
        self._advanced = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None  # the connection the consumer holds while it runs (see _consume)
        self.bus: BusMetrics | None = None  # langorch_bus_* of the gateway (set by the app)
        # since when the projector is known to be behind without moving (its consumer lost): /api/ready says so
        self.stalled_since: float | None = None
        self.stored_seen = 0  # the highest stored position read by wait() (moved on by any gateway replica)
        self._stored_at = -STORED_POLL_S  # when it was last read (time.monotonic)
        self._stored_lock = asyncio.Lock()
        self._hurry = asyncio.Event()  # set while a read-your-writes wait is pending: batches are not gathered
        self._hurrying = 0
        # since when received events are being applied without the position moving (time.monotonic; None when the
        # last batch was applied): a batch blocked or failing in the database, tried again from the stored position
        self.busy_since: float | None = None

    @abstractmethod
    def decode(self, msg: Msg) -> M:
        """The stream message as the item this projector applies."""

    @abstractmethod
    async def apply(self, conn: Any, item: M) -> None:
        """Apply one item in the batch's transaction (``conn`` is the batch's :class:`StatementBatch`, or the
        connection itself when a failed batch is applied message by message)."""

    def owner_of(self, item: M) -> Hashable | None:
        """Whose rows applying ``item`` writes (see :class:`StatementBatch`; None orders it after everything)."""
        return None

    async def after_batch(self, conn: Any) -> None:
        """Work done with every batch, in its transaction (nothing by default)."""

    def applied(self, batch: list[M | Poison]) -> None:
        """Called once the tables reflect every message of ``batch`` (applied by this projector, or found applied by
        another replica's), before the waiters of :meth:`wait` are woken (nothing by default)."""

    def subscribing(self) -> None:
        """Called when the consumer is created (again) from the stored position: the messages another replica's
        projector applied meanwhile are never received here (nothing by default)."""

    def received(self, item: M | Poison, pending: int) -> None:
        """Called for every message as it is received (decoded, not applied yet), with the number of messages the
        consumer had not delivered yet at that moment (nothing by default)."""

    async def load_position(self) -> int:
        async with self.pool.acquire() as conn:
            pos = await conn.fetchval("SELECT position FROM projection_positions WHERE name = $1", self.NAME)
        if int(pos or 0) > self.position:  # moved on (by another replica): not standing still
            self.busy_since = None
        self.position = int(pos or 0)
        return self.position

    async def apply_batch(self, batch: list[M | Poison]) -> None:
        try:
            await self._apply_grouped(batch)
        except Exception as exc:  # a defect of any kind in one message: find it by applying one at a time
            if _connection_trouble(exc):
                raise
            log.warning("projection %s: a batch failed (%s); applying it message by message", self.NAME, exc)
            await self._apply_one_by_one(batch)

    async def _apply_grouped(self, batch: list[M | Poison]) -> None:
        """Apply a batch in one transaction, its writes grouped (:class:`StatementBatch`), in two round trips besides
        those: the transaction's start with the lock of the position's row, then the new position with the commit.
        The position must still be the one this projector holds; when another projector of the same name (another
        gateway replica) moved it on meanwhile, the transaction is rolled back and the batch applied again from the
        stored position."""
        while True:
            held = self.position
            fresh = [e for e in batch if e.position > held]
            if not fresh:
                self.applied(batch)
                return
            async with self._connection() as conn:
                if await self._transaction(conn, fresh, held):
                    break
            log.info("projection %s: position moved on from %s meanwhile; applying from the stored one", self.NAME,
                     held)
            await self.load_position()
        self.applied(batch)
        await self._advance(fresh[-1].position)

    async def _transaction(self, conn: Any, fresh: list[M | Poison], held: int) -> bool:
        # NAME is a class constant and positions are ints: both are written as literals, so that the start and the
        # end are each one simple query of several statements (one round trip each)
        begin = f"BEGIN; SELECT 1 FROM projection_positions WHERE name = '{self.NAME}' FOR UPDATE"  # noqa: S608
        position, name = int(fresh[-1].position), self.NAME
        commit = f"""DO $$BEGIN
              INSERT INTO projection_positions AS p (name, position) VALUES ('{name}', {position})
                ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position WHERE p.position = {int(held)};
              IF NOT FOUND THEN RAISE EXCEPTION 'projection moved on' USING ERRCODE = '{MOVED_ON}'; END IF;
            END$$; COMMIT"""  # noqa: S608
        try:
            await conn.execute(begin)
            statements = StatementBatch()
            for i, e in enumerate(fresh, start=1):
                if not i % YIELD_EVERY:
                    await asyncio.sleep(0)  # the API's requests are served between chunks of a large batch
                if isinstance(e, Poison):
                    await self._dead_letter(conn, e.position, e.subject, e.error)
                else:
                    statements.owner = self.owner_of(e)
                    await self.apply(statements, e)
            await statements.send(conn)
            await self.after_batch(conn)
            await conn.execute(commit)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # a broken connection (or one the pool took back) is the pool's
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
            if isinstance(exc, asyncpg.PostgresError) and exc.sqlstate == MOVED_ON:
                return False
            raise
        return True

    async def _apply_one_by_one(self, batch: list[M | Poison]) -> None:
        """Apply a batch in one transaction, each message in a savepoint: one that fails is a dead letter."""
        fresh = [e for e in batch if e.position > self.position]
        if not fresh:
            self.applied(batch)
            return
        async with self._connection() as conn, conn.transaction():
            stored = await conn.fetchval(
                "SELECT position FROM projection_positions WHERE name = $1 FOR UPDATE", self.NAME
            )
            floor = int(stored or 0)
            for e in fresh:
                if e.position <= floor:
                    continue
                if isinstance(e, Poison):
                    await self._dead_letter(conn, e.position, e.subject, e.error)
                    continue
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
        self.applied(batch)
        await self._advance(fresh[-1].position)

    async def _advance(self, position: int) -> None:
        self.stalled_since = self.busy_since = None
        async with self._advanced:
            self.position = position
            self._advanced.notify_all()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """The consumer's own connection while it runs, else one of the pool's."""
        if self._conn is not None:
            yield self._conn
        else:
            async with self.pool.acquire() as conn:
                yield conn

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
        """Consume forever; after a failure, start again from the stored position a second later (at once after
        a reconnection, and a quarter of a second later while JetStream is still unavailable)."""
        while True:
            stop_if_cancelled()
            try:
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Resubscribe as again:
                log.info("projection %s: %s; consuming again from its stored position", self.NAME, again)
            except TRANSIENT_ERRORS as exc:
                log.info("projection %s: NATS unavailable (%s); trying again", self.NAME, type(exc).__name__)
                await asyncio.sleep(WATCH_S)
            except Exception:  # the consumer resumes from its stored position after any failure
                log.exception("projection %s failed; resuming from its stored position", self.NAME)
                await asyncio.sleep(1)

    async def _next(self, received: asyncio.Queue[T], seen: int) -> T:
        """The next received message. While none comes: :class:`Resubscribe` once the connection was established
        again (the ordered consumer went with the server), or when the projector is idle behind the stream head."""
        loop = asyncio.get_running_loop()
        idle_since = checked = loop.time()
        while True:
            try:
                return await asyncio.wait_for(received.get(), WATCH_S)
            except TimeoutError:
                pass
            now = loop.time()
            if reconnects(self.js) != seen:
                self.stalled_since = self.stalled_since or now
                raise Resubscribe("the NATS connection was established again")
            if now - idle_since >= IDLE_CHECK_S and now - checked >= IDLE_CHECK_S:
                checked = now
                if await self.head() > self.position:
                    self.stalled_since = self.stalled_since or idle_since
                    raise Resubscribe(f"idle at {self.position} behind the stream head")
                self.stalled_since = None

    async def _consume(self) -> None:
        """Consume from the stored position (an ordered consumer; no server-side state to clean)."""
        await self.load_position()
        self.subscribing()
        start = self.position + 1
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        # messages are taken (and decoded) as they arrive, also while a batch is being applied: the ordered
        # consumer's flow control is answered when its messages are delivered, and a subscription read only between
        # batches held the server's delivery back until the next batch began
        received: asyncio.Queue[tuple[str, dict[str, str] | None, M | Poison]] = asyncio.Queue(maxsize=PENDING)

        taken = 0

        async def take(msg: Msg) -> None:
            # nats-py hands the messages it has to this callback one after the other without leaving the loop
            nonlocal taken
            taken += 1
            if not taken % YIELD_EVERY:
                await asyncio.sleep(0)
            item = self._decode(msg)
            self.received(item, msg.metadata.num_pending or 0)
            await received.put((msg.subject, msg.headers, item))

        seen = reconnects(self.js)
        sub = await self.js.subscribe(self.SUBJECT, ordered_consumer=True, config=cfg, stream=self.STREAM, cb=take,
                                      pending_msgs_limit=PENDING)
        # one connection for every batch: a pool's release costs a round trip of its own (asyncpg resets the
        # session); after a connection failure the consumer starts again with a fresh one
        held = await self.pool.acquire()
        self._conn = held
        try:
            while True:
                stop_if_cancelled()  # _next's wait_for drops a cancellation that meets a message
                subject, headers, item = await self._next(received, seen)
                await self._gather(received)
                started = time.monotonic()
                subjects, contexts, batch = [subject], [headers], [item]
                while len(batch) < BATCH and not received.empty():
                    subject, headers, item = received.get_nowait()
                    subjects.append(subject)
                    contexts.append(headers)
                    batch.append(item)
                self.busy_since = self.busy_since or started
                with projection_spans(self.NAME, self.SUBJECT, subjects, contexts):
                    await self.apply_batch(batch)
                self.busy_since = None
                if self.bus is not None:  # a batch shares one transaction: each message its share of the time
                    share = (time.monotonic() - started) / len(batch)
                    for subject, item in zip(subjects, batch, strict=True):
                        self.bus.observe(subject, "term" if isinstance(item, Poison) else "ack", share)
        finally:
            self._conn = None
            with contextlib.suppress(NatsError, OSError):  # the connection may be closed or draining already
                await sub.unsubscribe()
            await self.pool.release(held)

    async def _gather(self, received: asyncio.Queue[Any]) -> None:
        """Let a small batch gather more messages for up to ``GATHER_S``, unless a read-your-writes wait is pending
        or begins meanwhile (the consumer's callback keeps receiving while this waits)."""
        if GATHER_S <= 0 or self._hurry.is_set() or received.qsize() >= GATHER_BELOW - 1:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), GATHER_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"projector-{self.NAME}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, position: int, timeout: float, *, hurry: bool = True) -> bool:
        """Wait until the projection has applied ``position``; False on timeout.

        Applied by this projector, or by another gateway replica's projector of the same name: they write the same
        tables, and the position stored with them says how far they are. So a client that wrote through one replica
        reads its write through another with the position the first returned (``X-LangOrch-Min-Position``), even
        while this replica's projector is behind. A waiter first gives this projector ``STORED_POLL_S``; the stored
        position is then read at most once every ``STORED_POLL_S`` for all the waiters of this projector.

        While a waiter with ``hurry`` waits, the projector applies what it receives at once instead of gathering a
        batch (``GATHER_S``); a watcher that is not a request (a benchmark's) passes ``hurry=False``."""
        if self.position >= position:
            return True
        if not hurry:
            return await self._wait(position, timeout)
        self._hurrying += 1
        self._hurry.set()
        try:
            return await self._wait(position, timeout)
        finally:
            self._hurrying -= 1
            if not self._hurrying:
                self._hurry.clear()

    async def _wait(self, position: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.position < position:
            remaining = deadline - loop.time()
            if remaining <= 0 or (self.drain is not None and self.drain.released):
                return False
            async with self._advanced:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._advanced.wait_for(lambda: self.position >= position),
                                           min(remaining, STORED_POLL_S))
            if self.position < position and await self._stored() >= position:
                return True
        return True

    async def _stored(self) -> int:
        """The highest stored position seen (moved on by any replica), read again when the last read is older than
        ``STORED_POLL_S``; a read that fails (the database unavailable or slow) leaves the last one seen."""
        async with self._stored_lock:
            if time.monotonic() - self._stored_at < STORED_POLL_S:
                return self.stored_seen
            try:
                async with self.pool.acquire(timeout=STORED_POLL_S * 5) as conn:
                    stored = int(await conn.fetchval("SELECT position FROM projection_positions WHERE name = $1",
                                                     self.NAME, timeout=STORED_POLL_S * 5) or 0)
                self.stored_seen = max(self.stored_seen, stored)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                log.debug("projection %s: reading the stored position failed", self.NAME, exc_info=True)
            self._stored_at = time.monotonic()
            return self.stored_seen

    def not_moving(self, now: float, stall_s: float) -> bool:
        """Whether this projector is known not to move: its consumer lost (``stalled_since``), or events applied
        for ``stall_s`` without the position moving (``busy_since``). ``now``: ``time.monotonic()``."""
        return self.stalled_since is not None or (self.busy_since is not None and now - self.busy_since >= stall_s)

    @property
    def served(self) -> int:
        """The position reads are known to reflect: this projector's, or a higher stored one seen by :meth:`wait`."""
        return max(self.position, self.stored_seen)

    async def head(self) -> int:
        """The last sequence of the followed stream (0 when empty)."""
        info = await self.js.stream_info(self.STREAM)
        return int(info.state.last_seq)

    async def catch_up(self, timeout: float = 60) -> None:
        """Wait until everything in the stream right now has been applied."""
        head = await self.head()
        if not await self.wait(head, timeout):
            raise TimeoutError(f"projection {self.NAME} stuck at {self.position}, stream head {head}")


@contextlib.contextmanager
def projection_spans(name: str, followed: str, subjects: list[str], headers: list[dict[str, str] | None]
                     ) -> Iterator[None]:
    """When spans are exported: a batch's span (``process <subject>``, linked to the trace of every message that
    carries one), and for each such message a span in its own trace, a child of the span that appended it, lasting
    as long as the batch, so that a run's trace reaches its projection."""
    if not tracing.exporting():
        yield
        return
    contexts = [tracing.extract(h) for h in headers]
    parents = [trace.get_current_span(c).get_span_context() for c in contexts]
    attributes = {"db.system": "postgresql", "db.system.name": "postgresql", "langorch.projection": name}
    with tracing.span(f"process {followed}", kind=SpanKind.CONSUMER, links=[Link(p) for p in parents if p.is_valid],
                      attributes={**attributes, **tracing.messaging_attributes(followed, "process"),
                                  "messaging.batch.message_count": len(subjects)}) as batch:
        started = time.time_ns()
        yield
    ended, link = time.time_ns(), [Link(batch.get_span_context())]
    for subject, context, parent in zip(subjects, contexts, parents, strict=True):
        if parent.is_valid:
            tracing.tracer().start_span(
                f"project {subject_template(subject)}", context=context, kind=SpanKind.CONSUMER, links=link,
                start_time=started, attributes={**attributes, **tracing.messaging_attributes(subject, "process")},
            ).end(ended)


@dataclass(frozen=True)
class AwaitedOutcome:
    """A command's outcome awaited on one aggregate (:meth:`Projector.expect`)."""

    aggregate: str
    aggregate_id: str
    future: asyncio.Future[StoredEvent]


class Projector(StreamProjector[StoredEvent]):
    """Follows ``LO_EVT`` and keeps the projection tables current."""

    NAME = NAME
    STREAM = EVENT_STREAM
    SUBJECT = "lo.evt.>"

    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext) -> None:
        super().__init__(pool, js)
        self._watchers: dict[str, list[Callable[[str | None], None]]] = {}
        self._outcomes: dict[str, list[AwaitedOutcome]] = {}
        self.live = False  # receiving events as they are appended (see expect)

    def expect(self, command_id: str, aggregate: str, aggregate_id: str) -> asyncio.Future[StoredEvent] | None:
        """A future of the first event ``command_id`` causes on the aggregate, resolved as this projector receives
        it — before it is applied. None while the projector is not live: catching up from its stored position
        (after a start, a reconnection, a backlog of more than ``LIVE_PENDING`` messages), when an event appended
        now would reach it only after everything before it; the caller then follows the aggregate itself. Register
        before the command is published; :meth:`forget` it afterwards, resolved or not."""
        if not self.live:
            return None
        outcome = AwaitedOutcome(aggregate, aggregate_id, asyncio.get_running_loop().create_future())
        self._outcomes.setdefault(command_id, []).append(outcome)
        return outcome.future

    def forget(self, command_id: str, future: asyncio.Future[StoredEvent]) -> None:
        waiting = self._outcomes.get(command_id)
        if waiting is None:
            return
        waiting[:] = [o for o in waiting if o.future is not future]
        if not waiting:
            del self._outcomes[command_id]

    def received(self, item: StoredEvent | Poison, pending: int) -> None:
        self.live = pending <= LIVE_PENDING
        if not self._outcomes or isinstance(item, Poison):
            return
        ev = item.envelope
        waiting = self._outcomes.get(ev.causation_id) if ev.causation_id else None
        if waiting:
            for outcome in waiting:
                if (outcome.aggregate == ev.aggregate and outcome.aggregate_id == ev.aggregate_id
                        and not outcome.future.done()):
                    outcome.future.set_result(item)

    def watch(self, aggregate: str, changed: Callable[[str | None], None]) -> None:
        """Call ``changed(aggregate_id)`` once the tables reflect an event of ``aggregate`` (whichever replica's
        projector applied it), before read-your-writes waiters of this projector wake; ``changed(None)`` when the
        consumer is created again (events applied by another replica meanwhile are never seen here). For the caches
        of projected rows: a cached row is forgotten when this replica's projector sees it change."""
        self._watchers.setdefault(aggregate, []).append(changed)

    def applied(self, batch: list[StoredEvent | Poison]) -> None:
        watchers = self._watchers
        if not watchers:
            return
        for item in batch:
            if isinstance(item, Poison):
                continue
            found = watchers.get(item.envelope.aggregate)
            if found:
                for changed in found:
                    changed(item.envelope.aggregate_id)

    def subscribing(self) -> None:
        self.live = False  # until a message says how far behind the consumer starts
        for found in self._watchers.values():
            for changed in found:
                changed(None)

    def decode(self, msg: Msg) -> StoredEvent:
        return decode_message(msg)

    async def apply(self, conn: Any, item: StoredEvent) -> None:
        await apply_event(conn, item)

    def owner_of(self, item: StoredEvent) -> Hashable:
        return item.envelope.aggregate, item.envelope.aggregate_id

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

    def owner_of(self, item: StoredAudit) -> Hashable:
        return item.entry.event_id


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
