"""JetStream: topology set-up, the ``EventStore`` adapter and command publishing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ckp_core.commands import Command
from ckp_core.errors import ConcurrencyError
from ckp_core.events import EventEnvelope
from ckp_core.eventstore import AggregateHead, StoredEvent
from ckp_core.subjects import (
    ARTIFACTS_BUCKET,
    AUDIT_STREAM,
    COMMAND_STREAM,
    EVENT_STREAM,
    EXTERNAL_STREAM,
    LEASES_BUCKET,
    LOCKS_BUCKET,
    PRESENCE_BUCKET,
    PROCEDURES_BUCKET,
    RATELIMITS_BUCKET,
    STEPS_BUCKET,
    aggregate_filter,
    command_subject,
    event_subject,
)
from langorch_infra import direct_get, tracing
from langorch_infra.bus import record_append_conflict
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.nats_auth import connect_options, nats_servers

if TYPE_CHECKING:
    from langorch_infra.settings import CommonSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
WRONG_LAST_SEQUENCE = 10071

STREAMS = (
    StreamConfig(name=EVENT_STREAM, subjects=["lo.evt.>"], retention=RetentionPolicy.LIMITS,
                 storage=StorageType.FILE, duplicate_window=120.0, allow_direct=True),
    StreamConfig(name=COMMAND_STREAM, subjects=["lo.cmd.>"], retention=RetentionPolicy.WORK_QUEUE,
                 storage=StorageType.FILE, duplicate_window=600.0),
    # api.md §16.2: inbound events of other systems (7 days, 10 min dedupe) and audit records
    StreamConfig(name=EXTERNAL_STREAM, subjects=["lo.ext.>"], retention=RetentionPolicy.LIMITS,
                 storage=StorageType.FILE, duplicate_window=600.0, max_age=7 * 86400.0),
    StreamConfig(name=AUDIT_STREAM, subjects=["lo.audit.>"], retention=RetentionPolicy.LIMITS,
                 storage=StorageType.FILE, duplicate_window=120.0, max_age=365 * 86400.0),
)
BUCKETS = (PROCEDURES_BUCKET, STEPS_BUCKET, LEASES_BUCKET, LOCKS_BUCKET, PRESENCE_BUCKET, RATELIMITS_BUCKET)


async def connect(url: str, name: str, settings: CommonSettings | None = None, *,
                  buffer_while_reconnecting: bool = True) -> NATS:
    """Connect to NATS, retrying the first connection for a few seconds; ``url`` may list several seed servers
    (comma-separated); with ``settings``, as their NATS credential and TLS settings say
    (:mod:`langorch_infra.nats_auth`).

    Without ``buffer_while_reconnecting``, a publish (a request included) while the connection is down raises
    ``OutboundBufferLimitError`` at once instead of being kept and sent once the connection is back: for the
    gateway, whose caller has been told by then that its command was not sent."""
    buffering = {} if buffer_while_reconnecting else {"pending_size": 0}
    return await nats.connect(nats_servers(url), name=name, connect_timeout=5, max_reconnect_attempts=-1,
                              reconnect_time_wait=0.5, **buffering, **connect_options(settings))


def _with_retention(cfg: StreamConfig, audit_retention_days: int | None) -> StreamConfig:
    """``LO_AUDIT`` keeps records ``audit_retention_days`` (api.md §16.2; the setting of the same name)."""
    if cfg.name != AUDIT_STREAM or audit_retention_days is None:
        return cfg
    return replace(cfg, max_age=audit_retention_days * 86400.0)


async def ensure_topology(js: JetStreamContext, *, audit_retention_days: int | None = None,
                          replicas: int | None = None) -> None:
    """Create the streams, KV buckets and the artifact object store if missing (idempotent; safe from every
    replica).

    ``audit_retention_days`` sets ``LO_AUDIT``'s max age; a caller that passes none leaves an existing
    ``LO_AUDIT`` as it is (and creates a missing one with the default 365 days). ``replicas``
    (``LANGORCH_NATS_REPLICAS``) is the replica count everything is created with, and an existing stream, bucket or
    store with another count is changed to it (the server moves the data); a caller that passes none creates at R1
    and changes no count. JetStream briefly unavailable (a leader being elected, a node restarting, a stream
    forming its replica group after a change) is waited out: each step is tried again with backoff.
    """
    for default in STREAMS:
        cfg = _with_retention(default, audit_retention_days)
        await _patiently(f"stream {cfg.name}", partial(_ensure_stream, js, cfg, audit_retention_days is None, replicas))
    for bucket in BUCKETS:
        await _patiently(f"KV bucket {bucket}", partial(_ensure_bucket, js, bucket, replicas))
    await _patiently(f"object store {ARTIFACTS_BUCKET}", partial(_ensure_object_store, js, replicas))
    for name in TOPOLOGY_STREAMS:
        await _patiently(f"stream {name}", partial(_led, js, name))


TOPOLOGY_STREAMS = (*(s.name or "" for s in STREAMS), *(f"KV_{b}" for b in BUCKETS), f"OBJ_{ARTIFACTS_BUCKET}")
"""The JetStream streams behind everything :func:`ensure_topology` keeps (buckets and the object store included)."""


class NoLeaderYet(Exception):
    """A stream on a cluster whose replicas have not elected a leader yet (just created, or its replicas changed)."""


TRANSIENT_ERRORS = (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError,
                    ServiceUnavailableError, nats.errors.ConnectionReconnectingError,
                    nats.errors.OutboundBufferLimitError, NoLeaderYet)
"""What JetStream answers while a stream or meta leader is being elected or a node restarts (or the client
reconnects)."""


async def _led(js: JetStreamContext, stream: str) -> None:
    """Raise :class:`NoLeaderYet` until ``stream`` has a leader: a publish to a stream still electing one finds no
    responder, so a service would fail its first write right after creating its topology on a cluster."""
    info = await js.stream_info(stream)
    if info.cluster is not None and not info.cluster.leader:
        raise NoLeaderYet(stream)


async def _patiently(what: str, step: Callable[[], Awaitable[T]], give_up_s: float = 60,
                     max_pause_s: float = 5.0) -> T:
    """``step`` again with growing pauses (up to ``max_pause_s``) while JetStream is briefly unavailable
    (:data:`TRANSIENT_ERRORS`), so a replica starting during a failover waits instead of exiting; raises after
    ``give_up_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_s
    pause = 0.2
    while True:
        try:
            return await step()
        except TRANSIENT_ERRORS as exc:
            if loop.time() + pause > deadline:
                raise
            log.warning("%s: JetStream unavailable (%s); trying again in %.1f s", what, type(exc).__name__, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, max_pause_s)


async def through_blips(what: str, step: Callable[[], Awaitable[T]], patience_s: float) -> T:
    """``step``, tried again through a NATS blip (a restart, a reconnect, a leader election) for up to
    ``patience_s``, with short pauses (at most a second) so it goes on soon after NATS is back. For writes that
    are safe to repeat (a KV put, an append carrying its event id) in work that must not be abandoned because NATS
    blinked: a step attempt whose agent call is in flight."""
    return await _patiently(what, step, patience_s, max_pause_s=1.0)


async def _ensure_stream(js: JetStreamContext, cfg: StreamConfig, keep_audit: bool, replicas: int | None) -> None:
    """Create ``cfg``'s stream, or bring it to ``cfg`` and ``replicas`` (``LO_AUDIT`` only to ``replicas`` when
    ``keep_audit``)."""
    try:
        info = await js.stream_info(cfg.name or "")
    except NotFoundError:
        try:
            await js.add_stream(replace(cfg, num_replicas=replicas or 1))
        except BadRequestError:  # created concurrently by another replica
            await js.stream_info(cfg.name or "")
        return
    current = info.config.num_replicas or 1
    target = replicas or current
    if cfg.name == AUDIT_STREAM and keep_audit:
        if target == current:
            return
        cfg = info.config
    if target != current:
        log.info("stream %s: replicas %d -> %d", cfg.name, current, target)
    await js.update_stream(replace(cfg, num_replicas=target))


async def _ensure_bucket(js: JetStreamContext, bucket: str, replicas: int | None) -> None:
    if not await _reconcile_replicas(js, f"KV_{bucket}", replicas):
        try:
            await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE,
                                                     replicas=replicas or 1))
        except BadRequestError:  # created concurrently by another replica
            await js.key_value(bucket)


async def _ensure_object_store(js: JetStreamContext, replicas: int | None) -> None:
    if not await _reconcile_replicas(js, f"OBJ_{ARTIFACTS_BUCKET}", replicas):
        try:
            await js.create_object_store(ARTIFACTS_BUCKET, ObjectStoreConfig(storage=StorageType.FILE,
                                                                             replicas=replicas or 1))
        except BadRequestError:  # created concurrently by another replica
            await js.object_store(ARTIFACTS_BUCKET)


async def _reconcile_replicas(js: JetStreamContext, stream: str, replicas: int | None) -> bool:
    """Bring the existing ``stream`` (a KV bucket's ``KV_<name>``, an object store's ``OBJ_<name>``) to
    ``replicas``, keeping the rest of its configuration; False when it does not exist."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        return False
    current = info.config.num_replicas or 1
    if replicas is not None and current != replicas:
        log.info("stream %s: replicas %d -> %d", stream, current, replicas)
        await js.update_stream(replace(info.config, num_replicas=replicas))
    return True


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> ConsumerInfo:
    """Create the durable consumer ``config.durable_name`` on ``stream``, or bring an existing one to ``config``.

    NATS ≥ 2.10 changes a durable's filter, ack wait and limits in place (its delivery state stays), so a consumer
    declared by an older version follows the current declaration. A change the server cannot make in place (the
    deliver or ack policy) raises: drift is not hidden.
    """
    return await js.add_consumer(stream, config)


async def narrow_consumer(js: JetStreamContext, stream: str, durable: str, filter_subjects: Sequence[str]) -> bool:
    """Set an existing durable's filter to ``filter_subjects``, keeping the rest of its configuration.

    For a consumer declared by an older version whose filter catches subjects another consumer owns now: on a
    work-queue stream (``LO_CMD``) the server refuses overlapping filters, so the old one is narrowed before the
    new one is created. False when ``durable`` does not exist (its owner declares it when it starts).
    """
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        return False
    config = info.config
    current = list(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))
    if sorted(current) != sorted(filter_subjects):
        log.info("consumer %s of %s: filter %s narrowed to %s", durable, stream, current, list(filter_subjects))
        await js.add_consumer(stream, replace(config, filter_subject=None, filter_subjects=list(filter_subjects)))
    return True


def encode_envelope(envelope: EventEnvelope) -> bytes:
    return envelope.model_dump_json().encode()


def decode_message(msg: Msg) -> StoredEvent:
    """Decode an ``LO_EVT`` message into its envelope and stream position."""
    envelope = EventEnvelope.model_validate_json(msg.data)
    return StoredEvent(envelope, msg.metadata.sequence.stream)


class JetStreamEventStore:
    """``EventStore`` on ``LO_EVT`` with per-aggregate expected-last-sequence checks.

    With ``patience_s``, an append that times out or finds JetStream unavailable is tried again for that long
    (:func:`through_blips`): the event carries its id, so a first try that landed after all is recognised (by the
    stream's duplicate window, or as the last event of the aggregate) and not appended twice."""

    def __init__(self, js: JetStreamContext, *, patience_s: float = 0) -> None:
        self.js = js
        self.patience_s = patience_s

    async def append(self, events: Sequence[EventEnvelope], *, expected_position: int) -> list[int]:
        positions: list[int] = []
        expected = expected_position
        for ev in events:
            filt = aggregate_filter(ev.aggregate, ev.aggregate_id)
            headers = {
                "Nats-Msg-Id": ev.event_id,
                "Nats-Expected-Last-Subject-Sequence": str(expected),
                "Nats-Expected-Last-Subject-Sequence-Subject": filt,
            }
            tracing.event_headers(headers)  # the projection's span continues the trace of the append
            publish = partial(self.js.publish, event_subject(ev.aggregate, ev.aggregate_id, ev.type),
                              encode_envelope(ev), headers=headers)
            try:
                ack = await (through_blips(f"append to {filt}", publish, self.patience_s) if self.patience_s
                             else publish())
            except APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                last = await self._last_message(filt)
                if last is not None and (last.headers or {}).get("Nats-Msg-Id") == ev.event_id:
                    positions.append(last.seq)  # an earlier try of this same append landed
                    expected = last.seq
                    continue
                record_append_conflict(ev.aggregate)
                raise ConcurrencyError(
                    f"{ev.aggregate} {ev.aggregate_id}: expected position {expected}, found "
                    f"{last.seq if last else 0}",
                    details={"expected": expected, "actual": last.seq if last else 0},
                ) from exc
            positions.append(ack.seq)
            expected = ack.seq
        return positions

    async def _last_message(self, filt: str) -> Any:
        try:
            return await self.js.get_last_msg(EVENT_STREAM, filt)
        except NotFoundError:
            return None

    async def head(self, aggregate: str, aggregate_id: str) -> AggregateHead | None:
        last = await self._last_message(aggregate_filter(aggregate, aggregate_id))
        if last is None:
            return None
        envelope = EventEnvelope.model_validate_json(last.data)
        return AggregateHead(envelope.seq, last.seq)

    async def read(self, aggregate: str, aggregate_id: str, after_position: int = 0) -> list[StoredEvent]:
        head = await self.head(aggregate, aggregate_id)
        if head is None or head.position <= after_position:
            return []
        filt = aggregate_filter(aggregate, aggregate_id)
        nc = getattr(self.js, "_nc", None)
        if nc is not None:  # one request, no consumer; a replica behind the leader's head answers None
            found = await direct_get.read_range(nc, EVENT_STREAM, filt, after_position, head.position)
            if found is not None:
                return found
        out: list[StoredEvent] = []
        # closed on leaving, not when collected: its consumer is deleted before this returns
        async with contextlib.aclosing(follow(self.js, filt, after_position)) as events:
            async for stored in events:
                out.append(stored)
                if stored.position >= head.position:
                    break
        return out


WATCH_S = 0.25
"""How often a live follower (:func:`follow`, the projectors) looks whether its connection was re-established."""
RESUBSCRIBE_PATIENCE_S = 60.0
"""How long a follower tries to subscribe again after a reconnection while JetStream is still starting."""


def reconnects(js: JetStreamContext) -> int:
    """How often the connection behind ``js`` was re-established (0 for a context without one)."""
    nc = getattr(js, "_nc", None)
    return int(nc.stats.get("reconnects", 0)) if nc is not None else 0


async def follow(js: JetStreamContext, subject: str, after_position: int = 0,
                 *, new_only: bool = False) -> AsyncGenerator[StoredEvent, None]:
    """Yield events on ``subject`` after ``after_position`` and then live, via an ordered consumer.

    The ordered consumer is server state that a NATS restart loses; nats-py notices it only when idle heartbeats
    stop coming, seconds later. So once the connection is re-established, the follower subscribes again after the
    last event it yielded (trying for ``RESUBSCRIBE_PATIENCE_S`` while JetStream starts): a live stream resumes
    as soon as NATS is back.

    ``new_only``: only events appended from now on — after the stream's last sequence when the follower starts (not
    the server's "deliver new", which a subscription made again after a reconnection would apply to its own later
    moment, losing what was appended while the connection was down)."""
    if new_only:
        after_position = await stream_last_position(js)
    position, first = after_position, True
    while True:
        if position > 0:
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=position + 1)
        else:
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        seen = reconnects(js)
        subscribe = partial(js.subscribe, subject, ordered_consumer=True, config=cfg, stream=EVENT_STREAM)
        sub = await (subscribe() if first else _patiently(f"following {subject}", subscribe, RESUBSCRIBE_PATIENCE_S,
                                                           max_pause_s=0.5))
        first = False
        try:
            while reconnects(js) == seen:
                stop_if_cancelled()
                try:
                    msg = await sub.next_msg(timeout=WATCH_S)
                except nats.errors.TimeoutError:
                    continue
                stored = decode_message(msg)
                position = stored.position
                yield stored
        finally:
            await _end_ordered(js, sub)
        log.info("following %s again after a reconnection, after position %d", subject, position)


CONSUMER_DELETE_TIMEOUT_S = 2.0


async def _end_ordered(js: JetStreamContext, sub: Any) -> None:
    """Unsubscribe a follower and delete its ordered consumer at once. Unsubscribing alone leaves the ephemeral
    consumer on the server until its inactivity threshold (5 s), and nats-server ≥ 2.15 caps a stream at 1,000
    consumers by default: a burst of short reads (the runtime reads a run's history for each of its commands) would
    otherwise hit ``maximum consumers limit reached``. Best effort: the server still removes it when inactive."""
    name = getattr(sub, "_consumer", None)  # nats-py keeps the current name there, also after an ordered reset
    try:
        await sub.unsubscribe()
    except (nats.errors.Error, OSError):  # the connection may be closed or draining already
        log.debug("unsubscribe after follow failed", exc_info=True)
    if not name:
        return
    try:
        await asyncio.wait_for(js.delete_consumer(EVENT_STREAM, name), CONSUMER_DELETE_TIMEOUT_S)
    except (nats.errors.Error, APIError, OSError, TimeoutError):
        log.debug("deleting the consumer %s after follow failed", name, exc_info=True)


async def publish_command(js: JetStreamContext, command: Command, *, msg_id: str | None = None) -> int:
    """Publish a command on ``lo.cmd.<aggregate>.<verb>`` with ``Nats-Msg-Id`` (= command id by default) and the
    current trace context (``traceparent``/``tracestate``, api.md §1.3) when a span is current."""
    headers = {"Nats-Msg-Id": msg_id or command.command_id}
    subject = command_subject(command.AGGREGATE, command.VERB)
    with tracing.producer_span(subject, headers):
        ack = await js.publish(subject, command.model_dump_json().encode(), headers=headers)
    return int(ack.seq)


async def stream_last_position(js: JetStreamContext) -> int:
    """The last sequence of ``LO_EVT`` (0 when empty)."""
    info = await js.stream_info(EVENT_STREAM)
    return int(info.state.last_seq)
