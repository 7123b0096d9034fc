"""Concurrency slots of a procedure's rate limit (``max_concurrent_operations``) are let go whatever ends the call
that holds one: a cancellation while the slot is being written, while the call runs, or while the slot is being
released. A slot left held blocks every run of the procedure until its TTL (30 s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js.errors import KeyDeletedError, KeyNotFoundError

from ckp_core.ir import RateLimitingIR
from ckp_core.subjects import RATELIMITS_BUCKET
from langorch_infra.jetstream import connect, ensure_topology
from langorch_runtime.ratelimit import ProcedureLimiter

pytestmark = pytest.mark.integration

LIMITS = RateLimitingIR(enabled=True, max_concurrent_operations=1, max_wait_ms=5000)


@pytest.fixture
async def limiter(nats_url: str) -> AsyncIterator[ProcedureLimiter]:
    nc = await connect(nats_url, "rate-limit-test")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        yield await ProcedureLimiter.open(js, "runtime-test")
    finally:
        await nc.close()


async def held_slots(limiter: ProcedureLimiter) -> dict[str, Any]:
    kv = await limiter.js.key_value(RATELIMITS_BUCKET)
    try:
        keys = await kv.keys()
    except Exception as exc:  # nats-py raises NoKeysError for an empty bucket
        if type(exc).__name__ == "NoKeysError":
            return {}
        raise
    held: dict[str, Any] = {}
    for key in (k for k in keys if k.startswith("ops.")):
        try:  # released between the listing and the read: not held
            held[key] = json.loads((await kv.get(key)).value or b"{}")
        except (KeyDeletedError, KeyNotFoundError):
            continue
    return held


async def until_free(limiter: ProcedureLimiter, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (held := await held_slots(limiter)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert held == {}, f"slots still held after {timeout} s: {held}"


async def test_a_slot_written_as_the_call_is_cancelled_is_let_go(limiter: ProcedureLimiter) -> None:
    """The slot's write lands, its answer does not reach the caller before the caller is cancelled."""
    real_create = limiter.kv.create
    landed = asyncio.Event()

    async def answer_late(*args: Any, **kwargs: Any) -> int:
        written = int(await real_create(*args, **kwargs))
        landed.set()
        await asyncio.sleep(30)
        return written

    limiter.kv.create = answer_late  # type: ignore[method-assign]
    called = asyncio.Event()

    async def call() -> None:
        async with limiter.admit("proc", LIMITS, None, {}):
            called.set()

    task = asyncio.create_task(call())
    await asyncio.wait_for(landed.wait(), 10)
    assert len(await held_slots(limiter)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until_free(limiter)
    assert not called.is_set()


async def test_a_cancellation_the_slot_write_swallowed_stops_the_call_and_lets_the_slot_go(
        limiter: ProcedureLimiter) -> None:
    """Python 3.11's ``wait_for`` (inside nats-py) returns the answer of a write that completed as its caller was
    cancelled: the call must still not be made, and the slot not kept."""
    real_create = limiter.kv.create

    async def swallowing(*args: Any, **kwargs: Any) -> int:
        written = int(await real_create(*args, **kwargs))
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # as wait_for does when its future is already done
            await asyncio.sleep(0)
        return written

    limiter.kv.create = swallowing  # type: ignore[method-assign]
    called = asyncio.Event()

    async def call() -> None:
        async with limiter.admit("proc", LIMITS, None, {}):
            called.set()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(call())
    assert not called.is_set()
    await until_free(limiter)


async def test_a_call_cancelled_while_its_slot_is_released_still_lets_it_go(limiter: ProcedureLimiter) -> None:
    real_delete = limiter.kv.delete
    deleting = asyncio.Event()

    async def slow_delete(*args: Any, **kwargs: Any) -> bool:
        deleting.set()
        await asyncio.sleep(0.3)
        return bool(await real_delete(*args, **kwargs))

    limiter.kv.delete = slow_delete  # type: ignore[method-assign]

    async def call() -> None:
        async with limiter.admit("proc", LIMITS, None, {}):
            pass

    task = asyncio.create_task(call())
    await asyncio.wait_for(deleting.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until_free(limiter)


async def test_slots_of_one_holder_are_told_apart(limiter: ProcedureLimiter) -> None:
    """Two acquisitions by the same replica write different values: a cut-off write is compared with its own."""
    values: list[dict[str, Any]] = []
    for _ in range(2):
        async with limiter.admit("proc", LIMITS, None, {}):
            values.extend((await held_slots(limiter)).values())
    assert len(values) == 2
    assert values[0]["holder"] == values[1]["holder"] == "runtime-test"
    assert values[0]["slot_id"] != values[1]["slot_id"]
    await limiter.settled()
    assert await held_slots(limiter) == {}
