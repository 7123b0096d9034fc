"""Admission control of run creations: refuse new runs quickly (429 ``rate_limited`` with ``Retry-After``) while
the runtime is behind, instead of queueing them without bound.

The backlog is what waits for the runtime in ``LO_CMD``: the creations its ``runtime-create`` consumer has not
decided yet (not delivered, or delivered and not acknowledged) plus the run commands its ``runtime`` consumer has
not handed to a replica yet (a replica fetches one only while it has a free run slot, so these are the runs
accepted and not started). Both counts are kept by the JetStream consumers themselves, so every gateway replica
reads the same numbers, whichever runtime replicas there are; a reading is two consumer look-ups, reused for
``admission_cache_ms``, with the creations this replica admitted since added (other replicas' are not: with
several gateways a burst may overshoot the limit by what the others admit in that time).

Only creations a client asked for are refused here (``POST /api/runs``, rerun, a manual fire, a webhook). Child
runs and the triggers service's own fires (schedules, events, file watches) are not: a child belongs to a run
already admitted, and a trigger has its own ``max_concurrent_runs``. They still count in the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ckp_core.subjects import COMMAND_STREAM
from langorch_gateway.deps import clients
from langorch_gateway.metrics import GatewayMetrics
from langorch_gateway.problems import ApiProblem

log = logging.getLogger(__name__)

CREATE_CONSUMER = "runtime-create"
RUN_CONSUMER = "runtime"
"""The runtime's durable consumers on ``LO_CMD`` (``langorch_runtime.creation``; the gateway does not import the
runtime)."""
READ_TIMEOUT_S = 1.0
"""Longest wait for one reading: a JetStream that does not answer admits (the publish then decides)."""


@dataclass(frozen=True)
class Reading:
    backlog: int | None  # None: not readable (NATS unavailable)
    at: float
    in_flight: int = 0  # this replica's admitted creations not decided yet when the reading was taken


async def read_backlog(js: JetStreamContext) -> int:
    """Creations not yet decided plus run commands not yet taken by a replica (a consumer not created yet: 0)."""

    async def count(durable: str, in_flight: bool) -> int:
        try:
            info = await js.consumer_info(COMMAND_STREAM, durable)
        except NotFoundError:
            return 0
        return int(info.num_pending or 0) + (int(info.num_ack_pending or 0) if in_flight else 0)

    created, started = await asyncio.gather(count(CREATE_CONSUMER, True), count(RUN_CONSUMER, False))
    return created + started


class Admission:
    """One gateway replica's admission control (``admission_*`` settings).

    Between two readings, what this replica admits is not in the reading yet: it is added (the creations in
    flight when the reading was taken, and those admitted since), so a burst on one replica does not overshoot the
    limit by what arrives within ``cache_s``. Other replicas' admissions since their reading are not seen."""

    def __init__(self, max_backlog: int, retry_after_s: int, cache_s: float,
                 metrics: GatewayMetrics | None = None) -> None:
        self.metrics = metrics
        self.max_backlog = max_backlog
        self.retry_after_s = retry_after_s
        self.cache_s = cache_s
        self.last = Reading(None, float("-inf"))
        self.lock = asyncio.Lock()
        self.in_flight = 0  # admitted, their command not decided yet
        self.since = 0  # admitted since the last reading

    async def reading(self, js: JetStreamContext) -> Reading:
        """The backlog, read at most once per ``cache_s`` (concurrent callers share one reading)."""
        if time.monotonic() - self.last.at < self.cache_s:
            return self.last
        async with self.lock:
            if time.monotonic() - self.last.at < self.cache_s:
                return self.last
            in_flight = self.in_flight
            try:
                value: int | None = await asyncio.wait_for(read_backlog(js), READ_TIMEOUT_S)
            except (NatsError, OSError, TimeoutError) as exc:
                log.debug("the runtime's backlog could not be read: %r", exc)
                value = None
            self.last = Reading(value, time.monotonic(), in_flight)
            self.since = 0
            if value is not None and self.metrics is not None:
                self.metrics.admission_backlog.set(value)
            return self.last

    async def check(self, js: JetStreamContext) -> None:
        """Raise 429 ``rate_limited`` when the backlog is at or above the limit (nothing when off or unreadable)."""
        if self.max_backlog <= 0:
            return
        last = await self.reading(js)
        if last.backlog is None:
            return
        backlog = last.backlog + last.in_flight + self.since
        if backlog >= self.max_backlog:
            if self.metrics is not None:
                self.metrics.admission_refusals.inc()
            raise ApiProblem("rate_limited", f"the runtime is behind ({backlog} run commands waiting, "
                             f"{self.max_backlog} at most); no run was created: retry after Retry-After seconds",
                             headers={"Retry-After": str(self.retry_after_s)}, backlog=backlog,
                             limit=self.max_backlog, retry_after_seconds=self.retry_after_s)

    @contextlib.asynccontextmanager
    async def admitted(self, js: JetStreamContext) -> AsyncIterator[None]:
        """:meth:`check`, then the block (publishing the creation and waiting for its outcome) counted as in flight."""
        await self.check(js)
        self.in_flight += 1
        self.since += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def admitted(request: Request) -> contextlib.AbstractAsyncContextManager[None]:
    """Refuse a run creation while the runtime's backlog is at the limit (before anything is published); the block
    publishes it."""
    app = clients(request)
    return app.admission.admitted(app.js)
