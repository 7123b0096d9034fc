"""Settling bus messages, and the bus metrics of api.md §13.1.

A message ends acked, nakked (with an optional delay), terminated, or left for JetStream's redelivery
(:class:`Settle`), and is counted in ``langorch_bus_messages_total{service, kind, outcome}`` and
``langorch_bus_handler_duration_seconds{service, subject}`` (the subject as a template: ids become ``*``).
The command consumers run on FastStream (:mod:`langorch_infra.messaging`, whose middleware settles and counts
through this module); a consumer still on nats-py fetches with :func:`fetch` (or loops in :func:`consume`) and
handles each message with :func:`handle_one`.

``langorch_event_append_conflicts_total{aggregate}`` counts the expected-sequence conflicts of event appends in
this process (the event store reports them through :func:`record_append_conflict`); each service registry
exposes the process-wide count, so ``langorch up``'s combined registry shows it once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError
from nats.errors import Error as NatsError
from nats.js.errors import ServiceUnavailableError
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from langorch_infra import tracing
from langorch_infra.cancel import stop_if_cancelled

log = logging.getLogger(__name__)

HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
Outcome = Literal["ack", "nak", "term", "leave"]


@dataclass(frozen=True)
class Settle:
    """What to do with a handled message. ``leave``: neither ack nor nak; JetStream redelivers it after its
    ack wait (counted as ``nak``, which is what it amounts to)."""

    outcome: Outcome = "ack"
    delay_s: float | None = None


ACK = Settle("ack")
TERM = Settle("term")
LEAVE = Settle("leave")


def nak(delay_s: float | None = None) -> Settle:
    return Settle("nak", delay_s)


def subject_template(subject: str) -> str:
    """``lo.evt.run.<id>.run_completed`` → ``lo.evt.run.*.run_completed``; command and audit subjects carry no
    id (``lo.cmd.<aggregate>.<verb>``, ``lo.audit.<category>.<action>``) and stay as they are; the subjects
    external systems choose under ``lo.ext.`` (which may carry their own ids) are all ``lo.ext.>``."""
    parts = subject.split(".")
    if len(parts) >= 3 and parts[0] == "lo" and parts[1] == "ext":
        return "lo.ext.>"
    if len(parts) >= 5 and parts[0] == "lo" and parts[1] == "evt":
        parts[3] = "*"
    return ".".join(parts)


class BusMetrics:
    """The bus metrics of one service, in its registry."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        self.messages = Counter("langorch_bus_messages_total", "Bus messages handled", ["service", "kind", "outcome"],
                                registry=registry)
        self.duration = Histogram("langorch_bus_handler_duration_seconds", "Bus message handler duration",
                                  ["service", "subject"], buckets=HANDLER_BUCKETS, registry=registry)
        registry.register(_ConflictCollector())

    def observe(self, subject: str, outcome: Outcome, seconds: float) -> None:
        kind = "cmd" if subject.startswith("lo.cmd.") else "evt"
        self.messages.labels(self.service, kind, "nak" if outcome == "leave" else outcome).inc()
        self.duration.labels(self.service, subject_template(subject)).observe(seconds)


async def settle(msg: Msg, how: Settle) -> None:
    """Ack (waiting for the server's confirmation), nak, term, or leave ``msg``."""
    if how.outcome == "ack":
        await msg.ack_sync()
    elif how.outcome == "nak":
        await msg.nak(delay=how.delay_s)
    elif how.outcome == "term":
        await msg.term()


async def handle_one(msg: Msg, handler: Callable[[Msg], Awaitable[Settle]], metrics: BusMetrics | None) -> None:
    """Run ``handler`` on ``msg`` in a span whose parent is the trace context of the message headers (api.md §1.3),
    settle it and count it. A handler that raises naks the message after 2 s (it is logged); settling errors (a
    connection lost meanwhile) are logged and left to redelivery."""
    started = time.monotonic()
    try:
        with tracing.consumer_span(subject_template(msg.subject), msg.headers):
            how = await handler(msg)
    except asyncio.CancelledError:
        raise
    except Exception:  # the handler boundary: any failure is logged and redelivered, never ends the consumer
        log.exception("handling %s failed; it will be redelivered", msg.subject)
        how = nak(2.0)
    try:
        await settle(msg, how)
    except asyncio.CancelledError:
        raise
    except (NatsError, OSError):  # a settle lost with the connection: JetStream redelivers after the ack wait
        log.warning("settling %s (%s) failed; it will be redelivered", msg.subject, how.outcome, exc_info=True)
    if metrics is not None:
        metrics.observe(msg.subject, how.outcome, time.monotonic() - started)


TRANSIENT_FETCH_ERRORS: tuple[type[Exception], ...] = (
    TimeoutError, ConnectionClosedError, ConnectionReconnectingError, ServiceUnavailableError, NoRespondersError)
"""What a fetch may raise while the server fails over or the client reconnects: the next fetch tries again."""
FETCH_RETRY_PAUSE_S = 0.5


async def fetch(sub: Any, batch: int, timeout_s: float) -> list[Msg]:
    """The next messages of the pull subscription ``sub``; none when the fetch timed out or hit a transient
    error (logged; a short pause first, so a closed connection does not spin)."""
    try:
        return list(await sub.fetch(batch, timeout=timeout_s))
    except TimeoutError:
        return []
    except TRANSIENT_FETCH_ERRORS as exc:
        log.info("fetch failed (%s); fetching again", type(exc).__name__)
        await asyncio.sleep(FETCH_RETRY_PAUSE_S)
        return []


async def consume(sub: Any, handler: Callable[[Msg], Awaitable[Settle]], metrics: BusMetrics | None, *,
                  batch: int = 10, fetch_timeout_s: float = 5.0, concurrently: bool = False) -> None:
    """Fetch from the pull subscription ``sub`` forever, handling its messages one at a time, in order (for a
    consumer not on FastStream), or, ``concurrently``, a fetched batch all at once (for messages about independent
    aggregates, whose order does not matter); a fetch's transient errors do not end it."""
    while True:
        stop_if_cancelled()
        msgs = await fetch(sub, batch, fetch_timeout_s)
        if concurrently and len(msgs) > 1:
            await asyncio.gather(*(handle_one(msg, handler, metrics) for msg in msgs))
            continue
        for msg in msgs:
            await handle_one(msg, handler, metrics)


_conflicts: collections.Counter[str] = collections.Counter()


def record_append_conflict(aggregate: str) -> None:
    """An append of this process found its aggregate moved past the expected sequence."""
    _conflicts[aggregate] += 1


class _ConflictCollector:
    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("langorch_event_append_conflicts", "Event appends refused by an "
                                     "expected-sequence conflict (this process)", labels=["aggregate"])
        for aggregate, count in sorted(_conflicts.items()):
            family.add_metric([aggregate], count)
        return [family]
