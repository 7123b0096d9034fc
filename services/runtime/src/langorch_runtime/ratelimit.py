"""Rate limits per procedure that hold across runtime replicas (ckp.md §7.6), in KV ``lo_ratelimits``.

``max_requests_per_minute`` is a token bucket (capacity = rate, refill rate/60 per second) kept in one key per
procedure and updated with revision checks, so concurrent replicas never spend the same token twice.
``max_concurrent_operations`` is a set of slot keys with a TTL (renewed while the call runs, deleted after).
A caller waits up to ``max_wait_ms``; a wait over 1 s emits ``rate_limit_wait``; longer → ``rate_limited``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from ckp_core.events import ErrorObject, EventData, RateLimitWait
from ckp_core.ids import new_id
from ckp_core.ir import RateLimitingIR
from ckp_core.subjects import RATELIMITS_BUCKET, kv_token
from langorch_infra.cancel import cancel_and_wait, stop_if_cancelled
from langorch_infra.kv import put_with_ttl
from langorch_runtime.deadlines import consume_outcome
from langorch_runtime.errors import StepError

SLOT_TTL_S = 30.0
POLL_S = 0.05


class ProcedureLimiter:
    def __init__(self, js: JetStreamContext, kv: KeyValue, holder: str) -> None:
        self.js = js
        self.kv = kv
        self.holder = holder
        self._releases: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(cls, js: JetStreamContext, holder: str) -> ProcedureLimiter:
        return cls(js, await js.key_value(RATELIMITS_BUCKET), holder)

    @contextlib.asynccontextmanager
    async def admit(self, procedure_id: str, limits: RateLimitingIR,
                    emit: Callable[[EventData], Awaitable[int]] | None,
                    position: dict[str, Any]) -> AsyncIterator[None]:
        """Hold a token (and a concurrency slot) for one external dispatch attempt."""
        if not limits.enabled:
            yield
            return
        deadline = time.monotonic() + limits.max_wait_ms / 1000
        if limits.max_requests_per_minute:
            waited = await self._token(procedure_id, limits.max_requests_per_minute, deadline)
            if waited > 1 and emit is not None:
                await emit(RateLimitWait(limiter="requests_per_minute", waited_ms=int(waited * 1000), **position))
        if not limits.max_concurrent_operations:
            yield
            return
        key, revision, waited = await self._slot(procedure_id, limits.max_concurrent_operations, deadline)
        held = {"revision": revision}
        renew = asyncio.create_task(self._renew(key, held))
        try:
            stop_if_cancelled()  # the slot's write may have swallowed it: the slot is let go, and nothing is called
            if waited > 1 and emit is not None:
                await emit(RateLimitWait(limiter="concurrent_operations", waited_ms=int(waited * 1000), **position))
            yield
        finally:
            # a task of its own, awaited through a shield: a caller cancelled meanwhile still lets the slot go
            releasing = self._in_background(self._release(key, held, renew))
            await asyncio.shield(releasing)

    async def _release(self, key: str, held: dict[str, int], renew: asyncio.Task[None]) -> None:
        await cancel_and_wait([renew])
        with contextlib.suppress(NatsError, OSError):  # the slot's key expires by its TTL anyway
            await self.kv.delete(key, last=held["revision"])

    def _in_background(self, releasing: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(releasing, name="rate-limit slot release")
        task.add_done_callback(consume_outcome)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return task

    async def settled(self) -> None:
        """Wait until every slot let go so far is deleted."""
        if self._releases:
            await asyncio.wait(list(self._releases))

    async def _token(self, procedure_id: str, rate: int, deadline: float) -> float:
        key = f"tokens.{kv_token(procedure_id)}"
        waited = 0.0  # time spent waiting for a token (not the KV round trips, slow as they may be under load)
        per_second = rate / 60
        while True:
            now = time.time()
            try:
                entry = await self.kv.get(key)
                state = json.loads(entry.value or b"{}")
                revision = entry.revision
            except KeyNotFoundError:
                state, revision = {"tokens": float(rate), "at": now}, 0
            tokens = min(float(rate), float(state.get("tokens", rate)) + (now - float(state.get("at", now))) *
                         per_second)
            if tokens >= 1:
                body = json.dumps({"tokens": tokens - 1, "at": now}).encode()
                try:
                    if revision:
                        await self.kv.update(key, body, last=revision)
                    else:
                        await self.kv.create(key, body)
                    return waited
                except (KeyWrongLastSequenceError, Exception) as exc:  # lost a race: read again
                    if not _conflict(exc):
                        raise
                    continue
            wait = (1 - tokens) / per_second
            if time.monotonic() + wait > deadline:
                raise StepError(ErrorObject(code="rate_limited", retryable=True, message=f"procedure "
                                            f"{procedure_id} is over {rate} requests per minute",
                                            details={"limiter": "requests_per_minute", "retry_after_ms":
                                                     int(wait * 1000)}))
            slept = time.monotonic()
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            waited += time.monotonic() - slept

    async def _slot(self, procedure_id: str, limit: int, deadline: float) -> tuple[str, int, float]:
        waited = 0.0  # time spent waiting for a free slot (not the KV round trips)
        # a unique id tells this acquisition's slot from another one of the same holder
        body = json.dumps({"holder": self.holder, "slot_id": new_id(), "at": time.time()}).encode()
        while True:
            for slot in range(limit):
                key = f"ops.{kv_token(procedure_id)}.{slot}"
                try:
                    revision = await self.kv.create(key, body, msg_ttl=round(SLOT_TTL_S))
                except KeyWrongLastSequenceError:
                    continue  # held (or taken meanwhile)
                except asyncio.CancelledError:
                    # the write may have landed although its answer is lost (a step canceled with its run, a
                    # branch ended by its sibling): the slot is let go in the background if it holds this write,
                    # rather than held until its TTL
                    self._in_background(self._release_if_written(key, body))
                    raise
                return key, int(revision), waited
            if time.monotonic() >= deadline:
                raise StepError(ErrorObject(code="rate_limited", retryable=True, message=f"procedure {procedure_id} "
                                            f"already has {limit} external operations in flight",
                                            details={"limiter": "concurrent_operations"}))
            slept = time.monotonic()
            await asyncio.sleep(POLL_S)
            waited += time.monotonic() - slept

    async def _renew(self, key: str, held: dict[str, int]) -> None:
        body = json.dumps({"holder": self.holder, "at": time.time()}).encode()
        while True:
            await asyncio.sleep(SLOT_TTL_S / 3)
            stop_if_cancelled()  # a renewal's KV request may have swallowed it: the slot is let go, not renewed on
            held["revision"] = await put_with_ttl(self.js, RATELIMITS_BUCKET, key, body, SLOT_TTL_S,
                                                  last=held["revision"])


    async def _release_if_written(self, key: str, body: bytes) -> None:
        """Delete ``key`` if it holds the slot ``body`` (written by a request whose answer was cut off)."""
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, KeyDeletedError, NotFoundError):
            return
        if entry.value == body:
            with contextlib.suppress(KeyWrongLastSequenceError):  # let go and taken again meanwhile
                await self.kv.delete(key, last=entry.revision)


def _conflict(exc: Exception) -> bool:
    if isinstance(exc, KeyWrongLastSequenceError):
        return True
    text = str(exc).lower()
    return "wrong last sequence" in text or "key exists" in text or "10071" in text
