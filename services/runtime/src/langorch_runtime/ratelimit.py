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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from ckp_core.events import ErrorObject, EventData, RateLimitWait
from ckp_core.ir import RateLimitingIR
from ckp_core.subjects import RATELIMITS_BUCKET, kv_token
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.kv import put_with_ttl
from langorch_runtime.errors import StepError

SLOT_TTL_S = 30.0
POLL_S = 0.05


class ProcedureLimiter:
    def __init__(self, js: JetStreamContext, kv: KeyValue, holder: str) -> None:
        self.js = js
        self.kv = kv
        self.holder = holder

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
        if waited > 1 and emit is not None:
            await emit(RateLimitWait(limiter="concurrent_operations", waited_ms=int(waited * 1000), **position))
        held = {"revision": revision}
        renew = asyncio.create_task(self._renew(key, held))
        try:
            yield
        finally:
            renew.cancel()
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await renew
            with contextlib.suppress(NatsError, OSError):  # the slot's key expires by its TTL anyway
                await self.kv.delete(key, last=held["revision"])

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
        body = json.dumps({"holder": self.holder, "at": time.time()}).encode()
        while True:
            for slot in range(limit):
                key = f"ops.{kv_token(procedure_id)}.{slot}"
                with contextlib.suppress(KeyWrongLastSequenceError):  # held (or taken meanwhile)
                    revision = await self.kv.create(key, body, msg_ttl=round(SLOT_TTL_S))
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


def _conflict(exc: Exception) -> bool:
    if isinstance(exc, KeyWrongLastSequenceError):
        return True
    text = str(exc).lower()
    return "wrong last sequence" in text or "key exists" in text or "10071" in text
