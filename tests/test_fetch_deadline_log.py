"""nats-py's fetch deadline does not reach the error log as a consumer failure.

FastStream's fetch loop suppresses ``nats.errors.TimeoutError``, while nats-py raises the builtin ``TimeoutError``
when the server's "no messages" answer to a pull request is handled after the fetch's deadline (a busy event loop:
the server answers about 0.1 ms before the client's own timer). The loop's task then ends and FastStream's
supervisor restarts it at once, logging an ERROR with a traceback — once per process, on an idle consumer, for
nothing. ``langorch_infra.messaging`` drops that one record and keeps every other error of the supervisor.

The first test gets the exception from a real nats-py fetch against a real JetStream server (an empty stream, an
event loop kept busy)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import nats
import pytest
from nats.js.api import ConsumerConfig, StreamConfig

from langorch_infra.messaging import faststream_log

RETRYING = ("Task-7 raised an exception, retrying...\nIf this behavior causes issues, you can disable it via "
            "setting the FASTSTREAM_SUPERVISOR_DISABLED env to 1.")


def supervisor_record(exc: BaseException) -> logging.LogRecord:
    """The record FastStream's task supervisor logs for a consume task that ended with ``exc``."""
    return faststream_log.makeRecord(faststream_log.name, logging.ERROR, __file__, 1, RETRYING, (),
                                     (type(exc), exc, exc.__traceback__))


async def busy(stop: asyncio.Event) -> None:
    """Keeps the event loop late: 3 ms of blocking work every turn."""
    while not stop.is_set():
        time.sleep(0.003)
        await asyncio.sleep(0)


@pytest.mark.integration
async def test_the_fetch_deadline_of_a_real_nats_fetch_is_not_logged(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    stream = f"DEADLINE_{uuid.uuid4().hex[:8]}"
    js = nc.jetstream()
    stop = asyncio.Event()
    loader = asyncio.create_task(busy(stop))
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
        await js.add_consumer(stream, ConsumerConfig(durable_name="idle"))
        sub = await js.pull_subscribe_bind("idle", stream=stream)
        caught: BaseException | None = None
        deadline = time.monotonic() + 60
        while caught is None:
            assert time.monotonic() < deadline, "nats-py never raised its own TimeoutError at a fetch's deadline"
            try:
                await sub.fetch(2, timeout=0.02)  # more than one: nats-py's _fetch_n, as FastStream's batches
            except nats.errors.TimeoutError:
                continue  # the client's timer fired first: FastStream suppresses this one itself
            except TimeoutError as exc:
                caught = exc
        assert type(caught) is TimeoutError
        assert faststream_log.filter(supervisor_record(caught)) is False
    finally:
        stop.set()
        await loader
        await nc.close()


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # the raised exception, with its traceback
        return e


@pytest.mark.unit
def test_every_other_supervisor_error_is_logged() -> None:
    assert faststream_log.filter(supervisor_record(raised(RuntimeError("consume loop broke")))) is True
    # a builtin TimeoutError raised anywhere but nats-py's fetch is a failure worth its line
    assert faststream_log.filter(supervisor_record(raised(TimeoutError()))) is True
    # and the fetch deadline, outside the supervisor's restart message, is left alone
    record = supervisor_record(raised(TimeoutError()))
    record.msg = "something else"
    assert faststream_log.filter(record) is True
