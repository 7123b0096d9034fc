"""A consumer's handler cancelled by its service's stop does not reach the error log as a failure.

FastStream logs whatever ends a handler at ERROR with a traceback; a stop cancels the handlers in progress (their
messages are not acknowledged and come back after the ack wait), so every stop under load printed a
``CancelledError`` traceback per handler it cut off. ``langorch_infra.messaging`` drops those records only."""

from __future__ import annotations

import asyncio
import logging
import uuid

import nats
import pytest
from faststream.nats import JStream, PullSub
from nats.js.api import StreamConfig

from langorch_infra.messaging import broker, faststream_log, stop_consuming


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def stopped_while_handling(nats_url: str) -> list[logging.LogRecord]:
    """Start a consumer whose handler waits, publish one message, stop the consumer as a service's stop does; the
    error records of FastStream's log that passed its filters."""
    stream = f"HANDLER_{uuid.uuid4().hex[:8]}"
    subject = f"{stream.lower()}.one"
    nc = await nats.connect(nats_url)
    b = broker(nats_url, "handler-cancelled-test", None)
    started = asyncio.Event()

    @b.subscriber(subject, stream=JStream(stream, declare=False), durable="handler",
                  pull_sub=PullSub(batch_size=1, timeout=1.0))
    async def handler(body: str) -> None:
        started.set()
        await asyncio.sleep(60)

    kept = Records()
    # what reaches the handlers of the logger (a logger's own filters run before them)
    faststream_log.addHandler(kept)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
        await b.connect()
        await b.start()
        await nc.jetstream().publish(subject, b'"hello"')
        await asyncio.wait_for(started.wait(), 20)
        await stop_consuming(b)
        await asyncio.sleep(0.2)
    finally:
        faststream_log.removeHandler(kept)
        await b.stop()
        await nc.jetstream().delete_stream(stream)
        await nc.close()
    return [r for r in kept.records if r.levelno >= logging.ERROR]


@pytest.mark.integration
async def test_a_handler_cancelled_by_the_stop_is_not_logged_as_an_error(nats_url: str) -> None:
    assert await stopped_while_handling(nats_url) == []


@pytest.mark.unit
def test_every_other_error_of_faststream_is_kept() -> None:
    def record(exc: BaseException) -> logging.LogRecord:
        return faststream_log.makeRecord(faststream_log.name, logging.ERROR, __file__, 1,
                                         f"{type(exc).__name__}: {exc}", (), (type(exc), exc, None))

    kept = [f.filter(record(RuntimeError("boom"))) for f in faststream_log.filters]
    assert all(kept)
    assert not all(f.filter(record(asyncio.CancelledError("stop"))) for f in faststream_log.filters)
