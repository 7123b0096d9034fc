"""Open SSE streams: at most ``LANGORCH_SSE_MAX_PER_PRINCIPAL`` per principal (api.md §5.7 Limits, §6.5), each
ended when the gateway starts to stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

from langorch_gateway.problems import ApiProblem
from langorch_infra.cancel import cancel_and_wait
from langorch_infra.hosting import Drain

T = TypeVar("T")


async def until_stopping(events: AsyncGenerator[T, None], drain: Drain) -> AsyncIterator[T]:
    """``events`` until the gateway starts to stop; the stream then ends. A client's EventSource reconnects after
    the stream's ``retry`` with its ``Last-Event-ID``, to a replica that serves, and misses nothing; an open stream
    no longer holds the stop until the server cuts it off (``SHUTDOWN_GRACE_S``, 10 s per pod in a rollout)."""
    stopping = drain.stopping()
    following: asyncio.Task[T] | None = None

    async def step() -> T:
        return await anext(events)

    try:
        while not stopping.done():
            following = asyncio.create_task(step())
            either: set[asyncio.Future[Any]] = {following, stopping}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        # the stream ended here (the stop, the client gone): the generator's step in progress first
        if following is not None and not following.done():
            await cancel_and_wait([following])
        await events.aclose()


class StreamSlots:
    """Counts the open streams of each principal in this gateway process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, principal: str) -> Callable[[], None]:
        """Take a slot or raise 429 ``too_many_streams``; returns an idempotent release (called both when the
        stream's generator ends and when the response finishes, so a stream that never started is released)."""
        if self.open.get(principal, 0) >= self.limit:
            raise ApiProblem("too_many_streams", f"{principal} already has {self.limit} open streams; close one",
                             limit=self.limit, retry_after_seconds=1)
        self.open[principal] = self.open.get(principal, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.open.get(principal, 1) - 1
            if left > 0:
                self.open[principal] = left
            else:
                self.open.pop(principal, None)

        return release
