"""The projector lets a small batch gather more messages (``GATHER_S``) only while no read-your-writes wait is
pending: a request waiting for its write is never held back by the gathering."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from langorch_gateway import projector as projector_module
from langorch_gateway.projector import Projector

pytestmark = pytest.mark.unit


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_pending_wait_ends_the_gathering_and_a_hurry_free_one_does_not(monkeypatch: Any) -> None:
    monkeypatch.setattr(projector_module, "GATHER_S", 3600.0)  # only a waiter can end it
    p = Projector(None, None)  # type: ignore[arg-type]  # no database: the stored position is never read

    async def stored() -> int:
        return 0

    monkeypatch.setattr(p, "_stored", stored)
    received: asyncio.Queue[Any] = asyncio.Queue()
    received.put_nowait("one message")

    gathering = asyncio.create_task(p._gather(received))
    watcher = asyncio.create_task(p.wait(5, 3600, hurry=False))  # a benchmark's watcher: not a request
    await turns()
    assert not gathering.done()

    request = asyncio.create_task(p.wait(5, 3600))  # a request's read-your-writes wait
    await gathering  # ends without the 3600 s
    assert p._hurry.is_set()
    assert (await p._gather(received)) is None  # a new batch is not gathered either while the request waits

    await p._advance(5)
    assert await request is True
    assert await watcher is True
    assert not p._hurry.is_set()  # no request waits any more: batches gather again
    again = asyncio.create_task(p._gather(received))
    await turns()
    assert not again.done()
    again.cancel()


async def test_a_full_enough_batch_is_not_gathered(monkeypatch: Any) -> None:
    monkeypatch.setattr(projector_module, "GATHER_S", 3600.0)
    p = Projector(None, None)  # type: ignore[arg-type]
    received: asyncio.Queue[Any] = asyncio.Queue()
    for i in range(projector_module.GATHER_BELOW):
        received.put_nowait(i)
    await p._gather(received)  # returns at once
    monkeypatch.setattr(projector_module, "GATHER_S", 0.0)
    await p._gather(asyncio.Queue())  # gathering off
